//! Tenant names interned to small numbers, with each tenant's message counts.

use std::collections::HashMap;

/// Visible and in-flight messages of one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantCounts {
    /// Visible messages.
    pub visible: usize,
    /// Received messages whose visibility has not expired.
    pub in_flight: usize,
}

/// Tenant names interned to small numbers (0 is the tenant of requests without one), with their
/// message counts. The prefetch buffer interns its tenants with it too.
#[derive(Debug)]
pub struct Tenants {
    pub(super) names: Vec<Box<str>>,
    pub(super) ids: HashMap<Box<str>, u32>,
    pub(super) counts: Vec<TenantCounts>,
}

impl Default for Tenants {
    fn default() -> Self {
        Self {
            names: vec!["".into()],
            ids: HashMap::from([("".into(), 0)]),
            counts: vec![TenantCounts::default()],
        }
    }
}

impl Tenants {
    /// The number of `name` (None is ""), interned on first sight.
    pub fn intern(&mut self, name: Option<&str>) -> u32 {
        let name = name.unwrap_or("");
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("more than 2^32 tenants");
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        self.counts.push(TenantCounts::default());
        id
    }
}

impl Tenants {
    /// The name of an interned tenant ("" for an unknown number).
    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |name| name)
    }
}
