//! The store's structural invariants, checked by a full scan (tests and debugging only).

use std::collections::HashMap;
use std::hash::BuildHasher;

use super::{OrdTime, Store, TenantCounts};
use crate::index::Ranking;

impl<P, R: Ranking> Store<P, R> {
    /// Checks every structural invariant by a full scan (tests and debugging only): each
    /// message is in exactly one of the visible index and the in-flight set, the index matches
    /// the visible messages, counts agree, the id table maps every id.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut visible = Vec::new();
        let mut tenant_counts: HashMap<u32, TenantCounts> = HashMap::new();
        let mut outbox: HashMap<u32, usize> = HashMap::new();
        for m in &self.outbox {
            *outbox.entry(m.tenant).or_default() += 1;
        }
        for (slot, s) in self.slots.iter().enumerate() {
            let Some(m) = &s.message else { continue };
            if !self.tenants.entries.contains_key(&m.tenant) {
                return Err(format!("slot {slot} names tenant {} that the store forgot", m.tenant));
            }
            let counts = tenant_counts.entry(m.tenant).or_default();
            if s.deadline.is_nan() {
                visible.push((slot as u32, m.index_entry()));
                counts.visible += 1;
            } else {
                if !self.in_flight.contains(&(OrdTime(s.deadline), slot as u32)) {
                    return Err(format!("slot {slot} is in flight but not in the in-flight set"));
                }
                counts.in_flight += 1;
            }
            let hash = self.hasher.hash_one(&*m.request_id);
            if self.ids.find(hash, |&x| x == slot as u32).is_none() {
                return Err(format!("id {:?} does not map to its slot", m.request_id));
            }
        }
        self.index.check(&visible)?;
        for &(OrdTime(deadline), slot) in &self.in_flight {
            let s = &self.slots[slot as usize];
            if s.message.is_none() || s.deadline.to_bits() != deadline.to_bits() {
                return Err(format!("in-flight entry of slot {slot} does not match the slot"));
            }
        }
        let occupied = self.slots.iter().filter(|s| s.message.is_some()).count();
        if occupied != visible.len() + self.in_flight.len() {
            return Err(format!(
                "{occupied} messages but {} visible + {} in flight",
                visible.len(),
                self.in_flight.len()
            ));
        }
        if self.ids.len() != occupied {
            return Err(format!("{} ids for {occupied} messages", self.ids.len()));
        }
        if self.free.len() + occupied != self.slots.len() {
            return Err("free list out of date".into());
        }
        for (&id, tenant) in &self.tenants.entries {
            let expected = tenant_counts.get(&id).copied().unwrap_or_default();
            let expected_outbox = outbox.get(&id).copied().unwrap_or(0);
            if tenant.counts != expected || tenant.outbox != expected_outbox {
                return Err(format!(
                    "tenant {id}: counts {:?} and outbox {} != {expected:?} and {expected_outbox}",
                    tenant.counts, tenant.outbox
                ));
            }
        }
        if let Some(id) = outbox.keys().find(|id| !self.tenants.entries.contains_key(id)) {
            return Err(format!("a dead letter names tenant {id} that the store forgot"));
        }
        Ok(())
    }
}
