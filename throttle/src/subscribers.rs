//! Per-subscriber classes (`scope = "client"`): which subscriber has which class id, how many subflows
//! use it, and which minor ids are free. Sans-IO bookkeeping for [`crate::core::ThrottleState`].
//!
//! Minor ids come from one pool per qdisc (interface and direction), [`FIRST_CLIENT_MINOR`] to
//! [`LAST_CLIENT_MINOR`]; a freed id is reused before a new one is taken, lowest first, so ids stay dense
//! and allocation is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::config::{Direction, FIRST_CLIENT_MINOR, LAST_CLIENT_MINOR};
use crate::core::ClassId;

/// One subscriber of one class template in one direction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriberKey {
    /// The template's policy name.
    pub template: String,
    /// The interface its classes live on (a policy change may move the template).
    pub interface: String,
    /// The direction (uploads and downloads have separate qdiscs).
    pub direction: Direction,
    /// The subscriber: its client address masked to the template's prefix length.
    pub client: IpNet,
}

#[derive(Debug, Clone)]
struct Slot {
    id: ClassId,
    users: usize,
}

/// Why a subscriber got no class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// The template has `max_clients` classes in this direction.
    Template(u32),
    /// The qdisc has no free minor id left.
    Qdisc,
}

/// The allocations, and how many installed subflow rules use each.
#[derive(Debug, Clone, Default)]
pub struct Subscribers {
    slots: BTreeMap<SubscriberKey, Slot>,
    free: BTreeMap<(String, Direction), BTreeSet<u16>>,
    next: BTreeMap<(String, Direction), u16>,
    per_template: BTreeMap<(String, Direction), u32>,
    idle: BTreeSet<SubscriberKey>,
}

impl Subscribers {
    /// The class of `key`, if it has one.
    pub fn get(&self, key: &SubscriberKey) -> Option<ClassId> {
        self.slots.get(key).map(|s| s.id)
    }

    /// Counts one more installed rule using `key`'s class `id` (ignored unless `key` holds `id`: a rule
    /// may outlive its class when a removal failed).
    pub fn acquire(&mut self, key: &SubscriberKey, id: ClassId) {
        if let Some(slot) = self.slots.get_mut(key).filter(|s| s.id == id) {
            slot.users += 1;
            self.idle.remove(key);
        }
    }

    /// Counts one installed rule less using `key`'s class `id`.
    pub fn release(&mut self, key: &SubscriberKey, id: ClassId) {
        if let Some(slot) = self.slots.get_mut(key).filter(|s| s.id == id) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                self.idle.insert(key.clone());
            }
        }
    }

    /// Gives `key` a class on its interface (qdisc major `major`), at most `max_clients` per template
    /// and direction. The new class has no users yet.
    pub fn allocate(
        &mut self,
        key: &SubscriberKey,
        major: u16,
        max_clients: u32,
    ) -> Result<ClassId, Exhausted> {
        if let Some(id) = self.get(key) {
            return Ok(id);
        }
        let count = self
            .per_template
            .entry((key.template.clone(), key.direction))
            .or_default();
        if *count >= max_clients {
            return Err(Exhausted::Template(max_clients));
        }
        let pool = (key.interface.clone(), key.direction);
        let minor = match self.free.get_mut(&pool).and_then(|f| f.pop_first()) {
            Some(minor) => minor,
            None => {
                let next = self.next.entry(pool).or_insert(FIRST_CLIENT_MINOR);
                if *next > LAST_CLIENT_MINOR || *next < FIRST_CLIENT_MINOR {
                    return Err(Exhausted::Qdisc);
                }
                let minor = *next;
                *next = next.wrapping_add(1);
                minor
            }
        };
        *count += 1;
        let id = ClassId { major, minor };
        self.slots.insert(key.clone(), Slot { id, users: 0 });
        self.idle.insert(key.clone());
        Ok(id)
    }

    /// Whether `key` could get a class now: it has one, its template and qdisc have room, or a class of
    /// its template nobody uses can be freed for it.
    pub fn has_room(&self, key: &SubscriberKey, max_clients: u32) -> bool {
        if self.slots.contains_key(key) {
            return true;
        }
        if self
            .idle
            .iter()
            .any(|idle| idle.template == key.template && idle.direction == key.direction)
        {
            return true;
        }
        let count = self
            .per_template
            .get(&(key.template.clone(), key.direction))
            .copied()
            .unwrap_or(0);
        let pool = (key.interface.clone(), key.direction);
        let pool_room = self.free.get(&pool).is_some_and(|f| !f.is_empty())
            || self
                .next
                .get(&pool)
                .is_none_or(|next| (FIRST_CLIENT_MINOR..=LAST_CLIENT_MINOR).contains(next));
        count < max_clients && pool_room
    }

    /// Whether some class has no users.
    pub fn has_idle(&self) -> bool {
        !self.idle.is_empty()
    }

    /// Frees every class no installed rule uses; returns them.
    pub fn free_idle(&mut self) -> Vec<(SubscriberKey, ClassId)> {
        let mut freed = Vec::new();
        for key in std::mem::take(&mut self.idle) {
            let Some(slot) = self.slots.remove(&key) else {
                continue;
            };
            if let Some(count) = self
                .per_template
                .get_mut(&(key.template.clone(), key.direction))
            {
                *count = count.saturating_sub(1);
            }
            self.free
                .entry((key.interface.clone(), key.direction))
                .or_default()
                .insert(slot.id.minor);
            freed.push((key, slot.id));
        }
        freed
    }

    /// Every allocation: key and class id.
    pub fn iter(&self) -> impl Iterator<Item = (&SubscriberKey, ClassId)> {
        self.slots.iter().map(|(key, slot)| (key, slot.id))
    }

    /// Classes per template (both directions counted), from the running counts: cheap at any size.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for ((template, _), count) in &self.per_template {
            if *count > 0 {
                *counts.entry(template.clone()).or_default() += *count as usize;
            }
        }
        counts
    }

    /// Forgets every allocation (the kernel state was torn down).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client: &str) -> SubscriberKey {
        SubscriberKey {
            template: "t".into(),
            interface: "eth1".into(),
            direction: Direction::Download,
            client: client.parse().unwrap(),
        }
    }

    #[test]
    fn minors_are_allocated_reused_and_bounded() {
        let mut subs = Subscribers::default();
        let a = subs.allocate(&key("10.0.0.1/32"), 0x4d50, 2).unwrap();
        let b = subs.allocate(&key("10.0.0.2/32"), 0x4d50, 2).unwrap();
        assert_eq!(
            (a.minor, b.minor),
            (FIRST_CLIENT_MINOR, FIRST_CLIENT_MINOR + 1)
        );
        assert_eq!(
            subs.allocate(&key("10.0.0.3/32"), 0x4d50, 2),
            Err(Exhausted::Template(2))
        );
        subs.acquire(&key("10.0.0.2/32"), b);
        // a has no users: freed; b is kept.
        let freed = subs.free_idle();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].1, a);
        let c = subs.allocate(&key("10.0.0.3/32"), 0x4d50, 2).unwrap();
        assert_eq!(c, a, "the freed minor is reused");
        subs.release(&key("10.0.0.2/32"), b);
        assert_eq!(subs.free_idle().len(), 2);
        assert!(subs.counts().is_empty());
    }

    #[test]
    fn a_stale_release_does_not_touch_a_reused_class() {
        let mut subs = Subscribers::default();
        let a = subs.allocate(&key("10.0.0.1/32"), 1, 10).unwrap();
        subs.acquire(&key("10.0.0.1/32"), a);
        let wrong = ClassId {
            major: 1,
            minor: 0x2000,
        };
        subs.release(&key("10.0.0.1/32"), wrong);
        assert!(subs.free_idle().is_empty());
    }
}
