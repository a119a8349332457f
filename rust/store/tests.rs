//! The store's unit and property tests: its SQS semantics (receive order, visibility,
//! handles, dead-lettering, retention, withdrawal) and its index against a rebuild. (About 720
//! lines, one file: every test drives the same `Store` through the same few helpers.)

use super::*;
use proptest::prelude::*;

fn store() -> Store<u32> {
    Store::new(StoreConfig::default(), 0.0).unwrap()
}

fn new(id: &str, priority: u8, payload: u32) -> NewMessage<u32> {
    NewMessage {
        request_id: id.into(),
        payload,
        priority,
        tokens: 100,
        expected_processing_seconds: None,
        tenant: None,
        deadline: None,
    }
}

fn payloads(store: &Store<u32>, received: &[(u32, ReceiptHandle)]) -> Vec<u32> {
    received.iter().map(|&(slot, _)| store.message(slot).payload).collect()
}

#[test]
fn receive_order_is_priority_then_oldest() {
    let mut s = store();
    s.enqueue(new("a", 2, 1), 1.0).unwrap();
    s.enqueue(new("b", 0, 2), 2.0).unwrap();
    s.enqueue(new("c", 2, 3), 3.0).unwrap();
    s.enqueue(new("d", 0, 4), 4.0).unwrap();
    s.enqueue(new("e", 3, 5), 0.5).unwrap(); // clock stepped back: clamped to 4.0
    assert_eq!(s.message(s.slot_of("e").unwrap()).enqueued_at, 4.0);
    let got = s.receive(10, 30.0, 5.0).unwrap();
    assert_eq!(payloads(&s, &got), vec![2, 4, 1, 3, 5]);
    s.check_invariants().unwrap();
}

#[test]
fn visibility_expiry_returns_message_with_counts_and_keeps_the_handle_valid() {
    let mut s = store();
    s.enqueue(new("a", 2, 1), 0.0).unwrap();
    let (slot, h1) = s.receive(1, 10.0, 1.0).unwrap()[0];
    assert_eq!(s.visible_count(), 0);
    assert_eq!(s.in_flight_count(), 1);
    assert_eq!(s.next_visibility_change(), Some(11.0));
    assert!(s.receive(1, 10.0, 10.9).unwrap().is_empty());
    assert!(s.release_expired(11.0).is_empty());
    assert_eq!(s.visible_count(), 1);
    let m = s.message(slot);
    assert_eq!((m.receive_count, m.first_received_at()), (1, Some(1.0)));
    // Still the current handle: change_visibility re-leases without a receive.
    s.change_visibility(&h1.to_string(), 5.0, 12.0).unwrap();
    assert_eq!((s.visible_count(), s.in_flight_count()), (0, 1));
    assert_eq!(s.message(slot).receive_count, 1);
    s.release_expired(17.0);
    let (_, h2) = s.receive(1, 10.0, 17.0).unwrap()[0];
    assert_ne!(h1, h2);
    assert_eq!(s.message(slot).receive_count, 2);
    assert_eq!(s.message(slot).first_received_at(), Some(1.0));
    // The old handle is stale now: nothing changes.
    let err = s.delete(&h1.to_string(), 18.0).unwrap_err();
    assert!(matches!(err, CoreError::ReceiptHandle(_)));
    assert_eq!(s.in_flight_count(), 1);
    let deleted = s.delete(&h2.to_string(), 18.0).unwrap();
    assert_eq!(deleted.payload, 1);
    assert_eq!((s.visible_count(), s.in_flight_count()), (0, 0));
    assert!(s.delete(&h2.to_string(), 18.0).is_err());
    s.check_invariants().unwrap();
}

#[test]
fn expired_handle_still_deletes_until_received_again() {
    let mut s = store();
    s.enqueue(new("a", 1, 1), 0.0).unwrap();
    let (_, h) = s.receive(1, 1.0, 0.0).unwrap()[0];
    s.release_expired(5.0);
    assert_eq!(s.visible_count(), 1);
    s.delete(&h.to_string(), 5.0).unwrap();
    assert_eq!(s.visible_count(), 0);
    s.check_invariants().unwrap();
}

#[test]
fn zero_visibility_change_makes_visible_at_once() {
    let mut s = store();
    s.enqueue(new("a", 1, 1), 0.0).unwrap();
    let (_, h) = s.receive(1, 30.0, 0.0).unwrap()[0];
    s.change_visibility(&h.to_string(), 0.0, 1.0).unwrap();
    assert_eq!((s.visible_count(), s.in_flight_count()), (1, 0));
}

#[test]
fn bad_timeouts_and_handles_change_nothing() {
    let mut s = store();
    s.enqueue(new("a", 1, 1), 0.0).unwrap();
    for bad in [-0.1, 43_200.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(s.receive(1, bad, 0.0), Err(CoreError::InvalidRequest(_))));
    }
    assert_eq!(s.visible_count(), 1);
    let (_, h) = s.receive(1, 43_200.0, 0.0).unwrap()[0];
    for bad in [-1.0, f64::NAN, 50_000.0] {
        assert!(s.change_visibility(&h.to_string(), bad, 0.0).is_err());
    }
    assert_eq!(s.next_visibility_change(), Some(43_200.0));
    let text = h.to_string();
    let mut other_epoch = h;
    other_epoch.epoch ^= 1;
    for bad in [
        String::new(),
        "x".repeat(32),
        text.to_uppercase(),
        format!("+{}", &text[1..]),
        other_epoch.to_string(),
        ReceiptHandle { slot: 99, ..h }.to_string(),
    ] {
        assert!(matches!(s.delete(&bad, 0.0), Err(CoreError::ReceiptHandle(_))), "{bad}");
    }
    assert_eq!(s.in_flight_count(), 1);
    s.check_invariants().unwrap();
}

#[test]
fn never_received_message_has_no_valid_handle_even_in_a_reused_slot() {
    let mut s = store();
    s.enqueue(new("a", 1, 1), 0.0).unwrap();
    let (slot, h) = s.receive(1, 30.0, 0.0).unwrap()[0];
    s.delete(&h.to_string(), 0.0).unwrap();
    let reused = s.enqueue(new("b", 1, 2), 0.0).unwrap();
    assert_eq!(reused, slot);
    for generation in 0..=h.generation + 2 {
        let guess = ReceiptHandle { generation, ..h }.to_string();
        assert!(s.delete(&guess, 0.0).is_err());
    }
    assert_eq!(s.visible_count(), 1);
}

#[test]
fn duplicates_are_refused_and_ids_free_up_on_delete() {
    let mut s = store();
    s.enqueue(new("a", 1, 1), 0.0).unwrap();
    assert!(matches!(s.enqueue(new("a", 2, 2), 0.0), Err(CoreError::DuplicateRequest(_))));
    let (_, h) = s.receive(1, 30.0, 0.0).unwrap()[0];
    // In flight still counts as not deleted.
    assert!(s.enqueue(new("a", 2, 2), 0.0).is_err());
    s.delete(&h.to_string(), 0.0).unwrap();
    s.enqueue(new("a", 2, 3), 0.0).unwrap();
    assert_eq!(s.visible_count(), 1);
}

#[test]
fn withdrawing_takes_out_only_a_visible_message_and_frees_its_id() {
    let mut s = store();
    s.enqueue(new("a", 1, 1), 0.0).unwrap();
    s.enqueue(new("b", 1, 2), 0.0).unwrap();
    let (_, h) = s.receive(1, 30.0, 1.0).unwrap()[0];
    // In flight: its handler decides, nothing changes.
    assert!(s.withdraw_visible("a", 1.0).is_none());
    assert_eq!(s.in_flight_count(), 1);
    assert!(s.withdraw_visible("unknown", 1.0).is_none());
    let withdrawn = s.withdraw_visible("b", 1.0).expect("b is visible");
    assert_eq!(withdrawn.payload, 2);
    assert_eq!(s.visible_count(), 0);
    assert!(s.receive(1, 30.0, 1.0).unwrap().is_empty());
    s.enqueue(new("b", 1, 3), 1.0).unwrap(); // its id is free again
    s.delete(&h.to_string(), 1.0).unwrap();
    // Visible again after its lease ran out: withdrawn like a new one.
    let (_, _) = s.receive(1, 1.0, 2.0).unwrap()[0];
    assert_eq!(s.withdraw_visible("b", 4.0).map(|m| m.payload), Some(3));
    assert_eq!((s.visible_count(), s.in_flight_count()), (0, 0));
    s.check_invariants().unwrap();
}

#[test]
fn batch_is_validated_whole() {
    let mut s = store();
    s.enqueue(new("x", 1, 0), 0.0).unwrap();
    let bad_batches = vec![
        vec![new("a", 1, 1), new("b", 1, 2), new("a", 1, 3)],
        vec![new("a", 1, 1), new("x", 1, 2)],
        vec![new("a", 1, 1), new("", 1, 2)],
        vec![new("a", 1, 1), new("b", 4, 2)],
        vec![new("a", 1, 1), NewMessage { expected_processing_seconds: Some(f64::NAN), ..new("b", 1, 2) }],
    ];
    for mut batch in bad_batches {
        let before = batch.len();
        assert!(s.enqueue_batch(&mut batch, 0.0).is_err());
        assert_eq!(batch.len(), before); // handed back whole, to be dropped after the lock
        assert_eq!(s.visible_count(), 1);
        assert!(s.slot_of("a").is_none());
    }
    let slots = s.enqueue_batch(&mut vec![new("a", 3, 1), new("b", 0, 2)], 1.0).unwrap();
    assert_eq!(slots.len(), 2);
    assert!(s.message(slots[0]).message_id < s.message(slots[1]).message_id);
    assert_eq!(s.counts_by_priority(), [1, 1, 0, 1]);
    s.check_invariants().unwrap();
}

#[test]
fn max_receive_count_dead_letters_on_expiry() {
    let config = StoreConfig { max_receive_count: Some(2), ..StoreConfig::default() };
    let mut s = Store::new(config, 0.0).unwrap();
    s.enqueue(new("a", 1, 7), 0.0).unwrap();
    let (_, h1) = s.receive(1, 1.0, 0.0).unwrap()[0];
    assert!(s.release_expired(1.0).is_empty());
    let (_, h2) = s.receive(1, 1.0, 1.0).unwrap()[0];
    // Still in flight: the current handle works, the message stays.
    assert!(s.release_expired(1.5).is_empty());
    let dead = s.release_expired(2.0);
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].payload, dead[0].receive_count), (7, 2));
    assert_eq!(s.stats().dead_lettered, 1);
    assert_eq!((s.visible_count(), s.in_flight_count()), (0, 0));
    assert!(s.delete(&h2.to_string(), 2.0).is_err());
    assert!(s.delete(&h1.to_string(), 2.0).is_err());
    // The id is free again.
    s.enqueue(new("a", 1, 8), 2.0).unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn dead_letters_found_by_other_operations_wait_in_the_outbox() {
    let config = StoreConfig { max_receive_count: Some(1), ..StoreConfig::default() };
    let mut s = Store::new(config, 0.0).unwrap();
    s.enqueue(new("a", 1, 7), 0.0).unwrap();
    s.receive(1, 1.0, 0.0).unwrap();
    s.enqueue(new("b", 1, 8), 5.0).unwrap();
    assert_eq!(s.take_dead_lettered().len(), 1);
    assert!(s.release_expired(6.0).is_empty());
}

#[test]
fn retention_drops_old_messages_visible_and_in_flight() {
    let config = StoreConfig { message_retention: 100.0, ..StoreConfig::default() };
    let mut s = Store::new(config, 0.0).unwrap();
    s.enqueue(new("old", 1, 1), 0.0).unwrap();
    s.enqueue(new("leased", 1, 2), 10.0).unwrap();
    s.enqueue(new("new", 1, 3), 50.0).unwrap();
    let got = s.receive(2, 200.0, 20.0).unwrap();
    assert_eq!(payloads(&s, &got), vec![1, 2]);
    let h_old = got[0].1;
    s.change_visibility(&h_old.to_string(), 0.0, 30.0).unwrap();
    assert_eq!(s.oldest_enqueued_at(), Some(0.0));
    s.release_expired(100.0);
    assert_eq!(s.visible_count(), 2);
    s.release_expired(100.5);
    assert_eq!((s.visible_count(), s.in_flight_count()), (1, 1));
    assert_eq!(s.stats().expired, 1);
    assert_eq!(s.oldest_enqueued_at(), Some(50.0));
    assert_eq!(s.take_dropped(), vec![1]);
    // The leased one is past retention when its visibility ends: dropped, not returned.
    s.release_expired(220.0);
    assert_eq!((s.visible_count(), s.in_flight_count()), (0, 0));
    assert_eq!(s.stats().expired, 3);
    s.check_invariants().unwrap();
}

#[test]
fn peek_is_per_priority_in_receive_order_and_changes_nothing() {
    let mut s = store();
    for (i, tokens) in [5u64, 5000, 50, 500_000, 7].iter().enumerate() {
        let id = format!("m{i}");
        s.enqueue(NewMessage { tokens: *tokens, ..new(&id, 1, i as u32) }, i as f64).unwrap();
    }
    s.enqueue(new("other", 2, 99), 0.0).unwrap();
    let peeked: Vec<u32> = s.peek(1, 3).iter().map(|&slot| s.message(slot).payload).collect();
    assert_eq!(peeked, vec![0, 1, 2]);
    assert_eq!(s.peek(1, 100).len(), 5);
    assert!(s.peek(0, 10).is_empty());
    assert_eq!(s.visible_count(), 6);
}

#[test]
fn receive_slot_takes_a_chosen_message_and_refuses_invisible_ones() {
    let mut s = store();
    s.enqueue(new("a", 0, 1), 0.0).unwrap();
    let b = s.enqueue(new("b", 3, 2), 0.0).unwrap();
    let h = s.receive_slot(b, 30.0, 1.0).unwrap();
    assert_eq!(h.slot, b);
    assert!(matches!(s.receive_slot(b, 30.0, 1.0), Err(CoreError::MessageState(_))));
    assert!(s.receive_slot(1000, 30.0, 1.0).is_err());
    assert_eq!((s.visible_count(), s.in_flight_count()), (1, 1));
}

#[test]
fn purge_removes_everything_and_invalidates_handles() {
    let mut s = store();
    s.enqueue(new("a", 0, 1), 0.0).unwrap();
    s.enqueue(new("b", 0, 2), 0.0).unwrap();
    let (_, h) = s.receive(1, 30.0, 0.0).unwrap()[0];
    let mut gone = s.purge(1.0);
    gone.sort_unstable();
    assert_eq!(gone, vec![1, 2]);
    assert_eq!((s.visible_count(), s.in_flight_count()), (0, 0));
    s.enqueue(new("a", 0, 3), 2.0).unwrap();
    s.receive(1, 30.0, 2.0).unwrap();
    assert!(s.delete(&h.to_string(), 2.0).is_err());
    assert_eq!(s.stats().last_modified_at, 2.0);
    s.check_invariants().unwrap();
}

#[test]
fn config_is_validated() {
    assert!(Store::<u32>::new(StoreConfig { max_receive_count: Some(0), ..Default::default() }, 0.0).is_err());
    for bad in [0.0, -1.0, f64::NAN] {
        let config = StoreConfig { message_retention: bad, ..Default::default() };
        assert!(matches!(Store::<u32>::new(config, 0.0), Err(CoreError::InvalidConfig(_))));
    }
    let config = StoreConfig { message_retention: f64::INFINITY, ..Default::default() };
    assert!(Store::<u32>::new(config, 0.0).is_ok());
}

#[test]
fn cells_group_by_key_oldest_first() {
    let mut s = store();
    s.enqueue(NewMessage { tokens: 1000, ..new("a", 1, 1) }, 0.0).unwrap();
    s.enqueue(NewMessage { tokens: 1001, ..new("b", 1, 2) }, 1.0).unwrap();
    s.enqueue(NewMessage { tokens: 1, ..new("c", 1, 3) }, 2.0).unwrap();
    let cells = s.visible_cells();
    assert_eq!(cells.len(), 2);
    let key = CellKey::for_message(1, 0, 1000);
    let order: Vec<u32> = cells[&key].values().map(|&slot| s.message(slot).payload).collect();
    assert_eq!(order, vec![1, 2]);
}

#[test]
fn message_ids_and_handles_have_fixed_forms() {
    let text = format_message_id(0x1234);
    assert_eq!(text.len(), MESSAGE_ID_LEN);
    assert!(text.ends_with("-000000001234"));
    let h = ReceiptHandle { epoch: 0xdead_beef, slot: 7, generation: 9 };
    assert_eq!(ReceiptHandle::parse(&h.to_string()), Some(h));
}

// ----- property test: random operations against a simple model --------------------------

#[derive(Debug, Clone)]
enum Op {
    Enqueue { id: u8, priority: u8, tokens: u64 },
    Batch { ids: Vec<u8> },
    Receive { limit: usize, timeout: f64 },
    Delete { which: usize, stale: bool },
    Change { which: usize, timeout: f64 },
    Advance(f64),
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, 0u8..4, 0u64..100_000)
            .prop_map(|(id, priority, tokens)| Op::Enqueue { id, priority, tokens }),
        1 => prop::collection::vec(0u8..12, 0..4).prop_map(|ids| Op::Batch { ids }),
        3 => (0usize..4, prop_oneof![Just(0.0), 0.0f64..20.0])
            .prop_map(|(limit, timeout)| Op::Receive { limit, timeout }),
        2 => (0usize..16, any::<bool>()).prop_map(|(which, stale)| Op::Delete { which, stale }),
        1 => (0usize..16, 0.0f64..20.0).prop_map(|(which, timeout)| Op::Change { which, timeout }),
        3 => (0.0f64..15.0).prop_map(Op::Advance),
        1 => Just(Op::Purge),
    ]
}

#[derive(Debug, Clone)]
struct ModelMessage {
    id: u8,
    priority: u8,
    seq: u64,
    enqueued_at: f64,
    receive_count: u32,
    deadline: Option<f64>,
    handle: Option<String>,
}

#[derive(Default)]
struct Model {
    messages: Vec<ModelMessage>,
    stale: Vec<String>,
    seq: u64,
    dead: u64,
    expired: u64,
}

const MAX_RECEIVES: u32 = 3;
const RETENTION: f64 = 60.0;

impl Model {
    fn maintain(&mut self, now: f64) {
        let mut expiring: Vec<usize> = (0..self.messages.len())
            .filter(|&i| self.messages[i].deadline.is_some_and(|d| d <= now))
            .collect();
        expiring.sort_by(|&a, &b| self.messages[a].deadline.partial_cmp(&self.messages[b].deadline).unwrap());
        let mut remove = vec![];
        for i in expiring {
            let m = &mut self.messages[i];
            m.deadline = None;
            if now - m.enqueued_at > RETENTION {
                self.expired += 1;
                remove.push(i);
            } else if m.receive_count >= MAX_RECEIVES {
                self.dead += 1;
                remove.push(i);
            }
        }
        for i in 0..self.messages.len() {
            let m = &self.messages[i];
            if m.deadline.is_none() && !remove.contains(&i) && now - m.enqueued_at > RETENTION {
                self.expired += 1;
                remove.push(i);
            }
        }
        remove.sort_unstable();
        for i in remove.into_iter().rev() {
            let m = self.messages.remove(i);
            self.stale.extend(m.handle);
        }
    }

    fn visible(&self) -> Vec<usize> {
        let mut v: Vec<usize> =
            (0..self.messages.len()).filter(|&i| self.messages[i].deadline.is_none()).collect();
        v.sort_by_key(|&i| (self.messages[i].priority, self.messages[i].seq));
        v
    }
}

// One match over the operations reads better than helpers split across the file.
#[allow(clippy::too_many_lines)]
fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let config = StoreConfig { max_receive_count: Some(MAX_RECEIVES), message_retention: RETENTION };
    let mut s: Store<u32> = Store::new(config, 0.0).unwrap();
    let mut model = Model::default();
    let mut now = 0.0;
    for op in ops {
        match op {
            Op::Enqueue { id, priority, tokens } => {
                model.maintain(now);
                let message = NewMessage { tokens, ..new(&id.to_string(), priority, model.seq as u32) };
                let dup = model.messages.iter().any(|m| m.id == id);
                let result = s.enqueue(message, now);
                prop_assert_eq!(result.is_err(), dup);
                if !dup {
                    model.messages.push(ModelMessage {
                        id,
                        priority,
                        seq: model.seq,
                        enqueued_at: now,
                        receive_count: 0,
                        deadline: None,
                        handle: None,
                    });
                    model.seq += 1;
                }
            }
            Op::Batch { ids } => {
                model.maintain(now);
                let mut distinct = ids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let ok = distinct.len() == ids.len() && !model.messages.iter().any(|m| ids.contains(&m.id));
                let mut batch: Vec<_> = ids
                    .iter()
                    .enumerate()
                    .map(|(k, id)| new(&id.to_string(), 2, (model.seq + k as u64) as u32))
                    .collect();
                prop_assert_eq!(s.enqueue_batch(&mut batch, now).is_ok(), ok);
                if ok {
                    for id in ids {
                        model.messages.push(ModelMessage {
                            id,
                            priority: 2,
                            seq: model.seq,
                            enqueued_at: now,
                            receive_count: 0,
                            deadline: None,
                            handle: None,
                        });
                        model.seq += 1;
                    }
                }
            }
            Op::Receive { limit, timeout } => {
                model.maintain(now);
                let got = s.receive(limit, timeout, now).unwrap();
                let expected: Vec<usize> = model.visible().into_iter().take(limit).collect();
                prop_assert_eq!(got.len(), expected.len());
                for ((slot, handle), i) in got.iter().zip(&expected) {
                    let stored = s.message(*slot);
                    let m = &mut model.messages[*i];
                    prop_assert_eq!(u64::from(stored.payload), m.seq);
                    m.receive_count += 1;
                    prop_assert_eq!(stored.receive_count, m.receive_count);
                    m.deadline = Some(now + timeout);
                    model.stale.extend(m.handle.replace(handle.to_string()));
                }
                // Zero timeouts come back at the next operation at this instant.
            }
            Op::Delete { which, stale } => {
                model.maintain(now);
                if stale && !model.stale.is_empty() {
                    let h = model.stale[which % model.stale.len()].clone();
                    s.release_expired(now);
                    let before = (s.visible_count(), s.in_flight_count());
                    prop_assert!(matches!(s.delete(&h, now), Err(CoreError::ReceiptHandle(_))));
                    prop_assert_eq!(before, (s.visible_count(), s.in_flight_count()));
                } else {
                    let with_handle: Vec<usize> =
                        (0..model.messages.len()).filter(|&i| model.messages[i].handle.is_some()).collect();
                    if !with_handle.is_empty() {
                        let i = with_handle[which % with_handle.len()];
                        let m = model.messages.remove(i);
                        let h = m.handle.unwrap();
                        let deleted = s.delete(&h, now).unwrap();
                        prop_assert_eq!(u64::from(deleted.payload), m.seq);
                        model.stale.push(h);
                    }
                }
            }
            Op::Change { which, timeout } => {
                model.maintain(now);
                let with_handle: Vec<usize> =
                    (0..model.messages.len()).filter(|&i| model.messages[i].handle.is_some()).collect();
                if !with_handle.is_empty() {
                    let i = with_handle[which % with_handle.len()];
                    let h = model.messages[i].handle.clone().unwrap();
                    s.change_visibility(&h, timeout, now).unwrap();
                    model.messages[i].deadline = Some(now + timeout);
                    model.maintain(now);
                }
            }
            Op::Advance(dt) => {
                now += dt;
                model.maintain(now);
                s.release_expired(now);
            }
            Op::Purge => {
                model.maintain(now);
                s.purge(now);
                for m in model.messages.drain(..) {
                    model.stale.extend(m.handle);
                }
            }
        }
        // Compare maintained states: an operation that found nothing to do may not have run it.
        model.maintain(now);
        s.release_expired(now);
        s.take_dropped();
        s.check_invariants().map_err(TestCaseError::fail)?;
        let visible = model.messages.iter().filter(|m| m.deadline.is_none()).count();
        prop_assert_eq!(s.visible_count(), visible);
        prop_assert_eq!(s.in_flight_count(), model.messages.len() - visible);
        prop_assert_eq!(s.stats().dead_lettered, model.dead);
        prop_assert_eq!(s.stats().expired, model.expired);
        let mut by_priority = [0usize; 4];
        for m in model.messages.iter().filter(|m| m.deadline.is_none()) {
            by_priority[m.priority as usize] += 1;
        }
        prop_assert_eq!(s.counts_by_priority(), by_priority);
        let oldest = model.visible().iter().map(|&i| model.messages[i].enqueued_at).reduce(f64::min);
        prop_assert_eq!(s.oldest_enqueued_at(), oldest);
        let mut oldest_by_priority: [Option<f64>; 4] = [None; 4];
        for &i in &model.visible() {
            let m = &model.messages[i];
            let at = &mut oldest_by_priority[m.priority as usize];
            *at = Some(at.map_or(m.enqueued_at, |a| a.min(m.enqueued_at)));
        }
        prop_assert_eq!(s.oldest_enqueued_by_priority(), oldest_by_priority);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

#[test]
fn slots_stay_compact() {
    // The memory budget (<= 200 B per queued message) assumes this size for a pointer payload:
    // a request id of up to 23 bytes lives in the slot, with no heap block of its own.
    assert!(std::mem::size_of::<Slot<usize>>() <= 104, "{}", std::mem::size_of::<Slot<usize>>());
}

#[test]
fn messages_quote_like_python() {
    assert_eq!(py_repr("a"), "'a'");
    assert_eq!(py_repr("it's"), "\"it's\"");
    assert_eq!(py_repr("a'\"b\n"), "'a\\'\"b\\n'");
}

#[test]
fn a_released_message_is_as_if_that_receive_had_not_happened() {
    let config = StoreConfig { max_receive_count: Some(1), ..StoreConfig::default() };
    let mut s: Store<u32> = Store::new(config, 0.0).unwrap();
    s.enqueue(new("a", 2, 1), 0.0).unwrap();
    for round in 0..5 {
        let (slot, handle) = s.receive(1, 30.0, 1.0 + f64::from(round)).unwrap()[0];
        assert_eq!(s.message(slot).receive_count, 1);
        s.release(&handle.to_string(), 2.0 + f64::from(round)).unwrap();
        let m = s.message(slot);
        // Visible at once, no receive used up, its first receive forgotten.
        assert_eq!((m.receive_count, m.first_received_at()), (0, None));
        assert_eq!((s.visible_count(), s.in_flight_count()), (1, 0));
        // The handle is stale now: a second release changes nothing.
        assert!(matches!(s.release(&handle.to_string(), 3.0), Err(CoreError::ReceiptHandle(_))));
        s.check_invariants().unwrap();
    }
    // max_receive_count = 1 never dead-lettered it.
    assert_eq!(s.stats().dead_lettered, 0);
    // A release of a later receive keeps the earlier one's count and first receive.
    let (slot, h1) = s.receive(1, 10.0, 10.0).unwrap()[0];
    let _ = h1;
    s.release_expired(20.0); // dead-lettered: received once, max 1
    assert!(s.get(slot).is_none());
    assert!(matches!(s.release(&h1.to_string(), 20.0), Err(CoreError::ReceiptHandle(_))));
}

#[test]
fn release_keeps_the_first_receive_of_an_earlier_delivery() {
    let mut s = store();
    s.enqueue(new("a", 2, 1), 0.0).unwrap();
    let (slot, _) = s.receive(1, 5.0, 1.0).unwrap()[0];
    let (_, h2) = s.receive(1, 5.0, 7.0).unwrap()[0];
    s.release(&h2.to_string(), 8.0).unwrap();
    let m = s.message(slot);
    assert_eq!((m.receive_count, m.first_received_at()), (1, Some(1.0)));
}

#[test]
fn tenants_seen_once_are_forgotten_once_idle_past_the_retention() {
    let mut s = store();
    s.set_tenant_retention(60.0);
    let weighted = s.intern_tenant("configured");
    for i in 0..100_000u32 {
        let mut m = new(&format!("r{i}"), 2, i);
        m.tenant = Some(format!("t{i}").into());
        s.enqueue(m, 1.0).unwrap();
    }
    assert_eq!(s.known_tenants(), 100_002);
    let received = s.receive(100_000, 30.0, 2.0).unwrap();
    for (_, handle) in received {
        s.delete(&handle.to_string(), 3.0).unwrap();
    }
    // Idle since 3.0: kept through the window (their use may still count), forgotten after.
    s.release_expired(62.9);
    assert_eq!(s.known_tenants(), 100_002);
    s.release_expired(63.0);
    assert_eq!(s.known_tenants(), 2, "the default tenant and the configured one");
    assert_eq!(s.tenant_id("t7"), None);
    assert_eq!(s.tenant_id("configured"), Some(weighted));
    s.check_invariants().unwrap();
}

#[test]
fn a_dead_lettered_message_keeps_its_tenant_known_until_handed_off() {
    let mut s = store();
    let mut m = new("a", 2, 1);
    m.tenant = Some("t".into());
    s.enqueue(m, 0.0).unwrap();
    let (slot, handle) = s.receive(1, 30.0, 0.0).unwrap()[0];
    let tenant = s.message(slot).tenant;
    s.dead_letter_now(&handle.to_string(), 1.0).unwrap();
    s.enqueue(new("b", 2, 2), 100.0).unwrap();
    assert_eq!(s.tenant_name(tenant), "t");
    let dead = s.take_dead_lettered();
    // Still readable until the next operation, then forgotten.
    assert_eq!(s.tenant_name(dead[0].tenant), "t");
    s.release_expired(100.0);
    assert_eq!(s.tenant_id("t"), None);
    s.check_invariants().unwrap();
}

#[test]
fn a_batch_counts_each_tenant_of_its_runs() {
    // Runs of one tenant, tenants coming back after another, and both spellings of "no tenant"
    // (None and ""): the counts are those of the same messages enqueued one by one.
    let tenants = [Some("a"), Some("a"), Some("b"), None, Some(""), Some("a"), Some("b"), Some("b"), None];
    let batch = |prefix: &str| -> Vec<NewMessage<u32>> {
        tenants
            .iter()
            .enumerate()
            .map(|(i, tenant)| {
                let mut m = new(&format!("{prefix}{i}"), 2, i as u32);
                m.tenant = tenant.map(Into::into);
                m
            })
            .collect()
    };
    let mut batched = store();
    batched.enqueue_batch(&mut batch("x"), 1.0).unwrap();
    let mut single = store();
    for m in batch("x") {
        single.enqueue(m, 1.0).unwrap();
    }
    let counts = |s: &Store<u32>| {
        let mut counts: Vec<(String, usize)> =
            s.tenant_counts().map(|(n, c)| (n.to_owned(), c.visible)).collect();
        counts.sort();
        counts
    };
    assert_eq!(counts(&batched), vec![(String::new(), 3), ("a".into(), 3), ("b".into(), 3)]);
    assert_eq!(counts(&batched), counts(&single));
    batched.check_invariants().unwrap();
}

#[test]
fn request_ids_long_and_short_are_kept_whole() {
    let ids: Vec<String> = (1..40).map(|n| "ü".repeat(n / 2) + &"x".repeat(n % 2)).collect();
    let mut s = store();
    let mut batch: Vec<_> = ids.iter().enumerate().map(|(i, id)| new(id, 1, i as u32)).collect();
    let slots = s.enqueue_batch(&mut batch, 1.0).unwrap();
    for (slot, id) in slots.iter().zip(&ids) {
        assert_eq!(&*s.message(*slot).request_id, id.as_str());
        assert_eq!(s.slot_of(id), Some(*slot));
        assert!(s.enqueue(new(id, 1, 0), 2.0).is_err(), "{id:?} is queued already");
    }
    s.check_invariants().unwrap();
}
