//! Tenant names interned to small numbers, with each tenant's message counts, and the
//! reclamation of tenants nobody needs any more.
//!
//! A tenant is held while the store holds a message of it (visible, in flight, or dead-lettered
//! and waiting in the outbox), or while it is pinned (the tenant of requests without one, and
//! tenants a configuration names, such as `fair_priority`'s weights). Once it holds nothing it
//! is idle; an idle tenant is forgotten `retention` seconds later (the fairness window while a
//! `fair_priority` dispatcher uses the store: its token use counts that long after its last
//! message left, and a tenant that comes back within it must find its use again; 0 otherwise),
//! at the next operation. So a store that has seen 100,000 tenants once holds memory for none of
//! them a window after the last one left.
//!
//! Numbers are never reused while the store lives (they wrap after 2^32 tenants, skipping those
//! still known): a number that something outside the store still carries (a charge of the
//! usage ledger, a handed-out message's facts) can never name another tenant.

use std::collections::{HashMap, VecDeque};

/// Visible and in-flight messages of one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantCounts {
    /// Visible messages.
    pub visible: usize,
    /// Received messages whose visibility has not expired.
    pub in_flight: usize,
}

#[derive(Debug)]
pub(super) struct Tenant {
    pub(super) name: Box<str>,
    pub(super) counts: TenantCounts,
    /// Dead-lettered messages of the tenant waiting in the outbox.
    pub(super) outbox: usize,
    /// Never forgotten.
    pinned: bool,
    /// When it last stopped holding messages; NaN while it holds some.
    idle_since: f64,
}

impl Tenant {
    fn holds(&self) -> bool {
        self.counts.visible + self.counts.in_flight + self.outbox > 0
    }
}

/// Tenant names interned to numbers, with their message counts.
#[derive(Debug)]
pub(super) struct Tenants {
    ids: HashMap<Box<str>, u32>,
    pub(super) entries: HashMap<u32, Tenant>,
    next_id: u32,
    /// `(idle since, tenant)`, in the order tenants became idle.
    idle: VecDeque<(f64, u32)>,
    /// Seconds an idle tenant is kept.
    pub(super) retention: f64,
}

impl Default for Tenants {
    fn default() -> Self {
        let mut tenants = Self {
            ids: HashMap::new(),
            entries: HashMap::new(),
            next_id: 0,
            idle: VecDeque::new(),
            retention: 0.0,
        };
        let id = tenants.add("");
        debug_assert_eq!(id, 0);
        tenants.pin(0);
        tenants
    }
}

impl Tenants {
    /// The number of `name` (None is ""), interning it if new: a new tenant is idle until it
    /// holds a message.
    pub(super) fn intern(&mut self, name: Option<&str>) -> u32 {
        let name = match name {
            Some(name) if !name.is_empty() => name,
            _ => return 0, // interned first (see `default`) and pinned: never forgotten
        };
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        self.add(name)
    }

    /// Interns a name not known yet.
    fn add(&mut self, name: &str) -> u32 {
        let mut id = self.next_id;
        while self.entries.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        self.ids.insert(name.into(), id);
        self.entries.insert(
            id,
            Tenant {
                name: name.into(),
                counts: TenantCounts::default(),
                outbox: 0,
                pinned: false,
                idle_since: f64::NAN,
            },
        );
        id
    }

    /// Marks `id` as never to be forgotten.
    pub(super) fn pin(&mut self, id: u32) {
        if let Some(tenant) = self.entries.get_mut(&id) {
            tenant.pinned = true;
        }
    }

    /// The name of `id` ("" when unknown).
    pub(super) fn name(&self, id: u32) -> &str {
        self.entries.get(&id).map_or("", |t| &t.name)
    }

    /// The number of `name`, if known.
    pub(super) fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// Changes what `id` holds; a tenant that stops holding anything becomes idle at `now`.
    pub(super) fn change(&mut self, id: u32, now: f64, change: impl FnOnce(&mut Tenant)) {
        let Some(tenant) = self.entries.get_mut(&id) else { return };
        let held = tenant.holds();
        change(tenant);
        match (held, tenant.holds()) {
            (true, false) => {
                // Clamped so the queue stays in order if the clock steps back.
                let at = self.idle.back().map_or(now, |&(last, _)| now.max(last));
                tenant.idle_since = at;
                self.idle.push_back((at, id));
            }
            (false, true) => tenant.idle_since = f64::NAN,
            _ => {}
        }
    }

    /// Forgets the tenants that have been idle for `retention` seconds by `now` (not pinned).
    pub(super) fn reclaim(&mut self, now: f64) {
        let mut forgot = false;
        while let Some(&(since, id)) = self.idle.front() {
            if since + self.retention > now {
                break;
            }
            self.idle.pop_front();
            let Some(tenant) = self.entries.get(&id) else { continue };
            // A later record stands for a tenant that held messages again meanwhile.
            if tenant.pinned || tenant.idle_since.to_bits() != since.to_bits() {
                continue;
            }
            if let Some(tenant) = self.entries.remove(&id) {
                self.ids.remove(&tenant.name);
                forgot = true;
            }
        }
        if forgot && self.entries.len() * 4 < self.entries.capacity() {
            self.entries.shrink_to_fit();
            self.ids.shrink_to_fit();
        }
        if self.idle.len() * 4 < self.idle.capacity() {
            self.idle.shrink_to_fit();
        }
    }

    /// Known tenants (held, pinned, or idle and not yet forgotten).
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every known tenant: number, name, counts.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &str, TenantCounts)> {
        self.entries.iter().map(|(&id, t)| (id, &*t.name, t.counts))
    }

    /// After a purge: nothing is held any more.
    pub(super) fn purged(&mut self, now: f64) {
        let ids: Vec<u32> = self.entries.keys().copied().collect();
        for id in ids {
            self.change(id, now, |t| {
                t.counts = TenantCounts::default();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_tenant_is_forgotten_after_the_retention() {
        let mut tenants = Tenants { retention: 10.0, ..Tenants::default() };
        let a = tenants.intern(Some("a"));
        tenants.change(a, 0.0, |t| t.counts.visible += 1);
        tenants.change(a, 5.0, |t| t.counts.visible -= 1);
        tenants.reclaim(14.9);
        assert_eq!(tenants.id("a"), Some(a));
        tenants.reclaim(15.0);
        assert_eq!(tenants.id("a"), None);
        assert_eq!(tenants.name(a), "");
        // Numbers are not reused.
        assert_ne!(tenants.intern(Some("b")), a);
    }

    #[test]
    fn a_tenant_that_holds_messages_again_is_kept() {
        let mut tenants = Tenants { retention: 10.0, ..Tenants::default() };
        let a = tenants.intern(Some("a"));
        tenants.change(a, 0.0, |t| t.counts.visible += 1);
        tenants.change(a, 1.0, |t| t.counts.visible -= 1);
        tenants.change(a, 2.0, |t| t.outbox += 1);
        tenants.reclaim(100.0);
        assert_eq!(tenants.id("a"), Some(a));
        tenants.change(a, 100.0, |t| t.outbox -= 1);
        tenants.reclaim(109.0);
        assert_eq!(tenants.id("a"), Some(a));
        tenants.reclaim(110.0);
        assert_eq!(tenants.id("a"), None);
    }

    #[test]
    fn pinned_tenants_and_the_default_one_stay() {
        let mut tenants = Tenants::default();
        let a = tenants.intern(Some("a"));
        tenants.pin(a);
        tenants.change(a, 0.0, |t| t.counts.visible += 1);
        tenants.change(a, 0.0, |t| t.counts.visible -= 1);
        tenants.change(0, 0.0, |t| t.counts.visible += 1);
        tenants.change(0, 0.0, |t| t.counts.visible -= 1);
        tenants.reclaim(1e9);
        assert_eq!(tenants.id("a"), Some(a));
        assert_eq!(tenants.id(""), Some(0));
    }
}
