//! The order in which a merge writes its run: its table's key order, found by sorting small
//! values rather than the keys themselves.
//!
//! A run's keys are shared strings, each at a place of its own in memory. Sorted as they were,
//! every comparison read two of them and every move shifted a key's whole record. So each key
//! is given a [`Place`] of 16 bytes: a group (the heads' app), a number made of the key's
//! first 8 bytes after the prefix every key of the run shares, and its index. The places are
//! sorted as one number each, and only keys whose groups and numbers tie are compared whole.
//! Backends' ids often begin alike (the benchmark's `msg_id`s share an 18-byte prefix), which
//! is why the shared prefix is skipped: taken from their first bytes, the numbers of such
//! keys would all tie.

use std::cmp::Ordering;

/// A key's place in the run's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Place {
    /// Orders the keys before `order` does.
    pub(super) group: u32,
    /// The key's first 8 bytes after the shared prefix, big-endian and padded with zeros:
    /// where two keys' bytes differ in them, this orders them as their bytes do.
    pub(super) order: u64,
    /// The key's index among those sorted.
    pub(super) index: u32,
}

impl Place {
    /// What places are sorted by: one number, compared in an instruction or two.
    fn sort_key(&self) -> u128 {
        (u128::from(self.group) << 64) | u128::from(self.order)
    }
}

/// The places of `keys` in their order: by `group`, then by the bytes of `sorted_by`, then,
/// among keys whose groups and first bytes after the shared prefix are the same, by `tie`,
/// which is given the keys' indices (and so may order by them). `keys` holds at most
/// `u32::MAX` keys (a run holds a tail's, a few tens of thousands).
pub(super) fn places<T>(
    keys: &[T],
    group: impl Fn(&T) -> u32,
    sorted_by: impl Fn(&T) -> &[u8],
    tie: impl Fn(usize, usize) -> Ordering,
) -> Vec<Place> {
    let shared = shared_prefix_len(keys.iter().map(&sorted_by));
    let mut places: Vec<Place> = keys
        .iter()
        .zip(0..)
        .map(|(key, index)| Place {
            group: group(key),
            order: order_of(&sorted_by(key)[shared..]),
            index,
        })
        .collect();
    places.sort_unstable_by_key(Place::sort_key);
    for tied in places.chunk_by_mut(|a, b| a.sort_key() == b.sort_key()) {
        if tied.len() > 1 {
            tied.sort_unstable_by(|a, b| tie(a.index as usize, b.index as usize));
        }
    }
    places
}

/// How many leading bytes all of `keys` share.
fn shared_prefix_len<'a>(mut keys: impl Iterator<Item = &'a [u8]>) -> usize {
    let Some(first) = keys.next() else {
        return 0;
    };
    keys.fold(first.len(), |shared, key| shared_len(&first[..shared], key))
}

/// How many bytes `a` and `b` begin with alike, compared eight at a time: keys share most of
/// theirs (a sender's prefix), and a byte at a time this was most of a block's encoding
/// (`key_blocks`).
pub(super) fn shared_len(a: &[u8], b: &[u8]) -> usize {
    let words = a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .take_while(|(a, b)| a == b)
        .count();
    let at = words * 8;
    at + a[at..]
        .iter()
        .zip(&b[at..])
        .take_while(|(a, b)| a == b)
        .count()
}

/// The first 8 bytes of `bytes`, big-endian and padded with zeros.
fn order_of(bytes: &[u8]) -> u64 {
    let mut first = [0; 8];
    let len = bytes.len().min(first.len());
    first[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(first)
}

/// The items of `items` in the order of `places`, each an index into `items`; an item no place
/// names is left out (a run's places without the keys it writes once).
pub(super) fn take_in_order<T>(items: Vec<T>, places: &[Place]) -> Vec<T> {
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    // Sized at once: collected from the `filter_map`, which tells no lower bound, the run was
    // copied at every doubling, into fresh pages each time (4% of the CPU at saturation, the
    // kernel's zeroing of the pages included, `perf`).
    let mut sorted = Vec::with_capacity(places.len());
    sorted.extend(
        places
            .iter()
            .filter_map(|place| slots[place.index as usize].take()),
    );
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(keys: &[&str]) -> Vec<String> {
        let places = places(
            keys,
            |_| 0,
            |key| key.as_bytes(),
            |a, b| keys[a].cmp(keys[b]),
        );
        places
            .iter()
            .map(|place| keys[place.index as usize].to_owned())
            .collect()
    }

    /// Keys sort as their bytes do, whatever they share: a long common prefix and tails longer
    /// than the number (ties broken by `tie`), shorter keys, NUL bytes, bytes above 0x7f.
    #[test]
    fn keys_sort_as_their_bytes_do() {
        let keys = [
            "b18c4d2e9f0a1b2c3d4e5f-1-0123456789abcdefX",
            "b18c4d2e9f0a1b2c3d4e5f-1-0123456789abcdefA",
            "b18c4d2e9f0a1b2c3d4e5f-1-0123456789abcdef",
            "b18c4d2e9f0a1b2c3d4e5f-10",
            "b18c4d2e9f0a1b2c3d4e5f-1",
            "b18c4d2e9f0a1b2c3d4e5f-1\0",
            "b18c4d2e9f0a1b2c3d4e5f-9",
            "b18c4d2e9f0a1b2c3d4e5f-é",
            "b18c4d2e9f0a1b2c3d4e5f",
        ];
        let mut expected: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
        expected.sort_unstable();
        assert_eq!(sorted(&keys), expected);
        assert_eq!(sorted(&[]), Vec::<String>::new());
        assert_eq!(sorted(&["only"]), ["only"]);
    }

    /// Keys that differ only after a shared prefix longer than the number get numbers of
    /// their own, so that sorting them reads no key twice.
    #[test]
    fn keys_with_one_long_prefix_get_numbers_of_their_own() {
        let keys: Vec<String> = (0..100)
            .map(|n| format!("b18c4d2e9f0a1b2c3d4e5f-{n:03}"))
            .collect();
        let places = places(
            &keys,
            |_| 0,
            |key| key.as_bytes(),
            |_, _| panic!("no two numbers tie"),
        );
        assert!(places.windows(2).all(|pair| pair[0].order < pair[1].order));
    }

    /// The group orders keys before their bytes do.
    #[test]
    fn groups_come_first() {
        let keys = [(1, "a"), (0, "z"), (1, "b"), (0, "y")];
        let places = places(
            &keys,
            |key| key.0,
            |key| key.1.as_bytes(),
            |_, _| Ordering::Equal,
        );
        let order: Vec<&str> = places
            .iter()
            .map(|place| keys[place.index as usize].1)
            .collect();
        assert_eq!(order, ["y", "z", "a", "b"]);
    }

    /// Places come out as a comparison sort orders the keys, for keys of every length over a
    /// few letters (many alike in their first 8 bytes, many the same) in groups that differ
    /// in each of their bytes.
    #[test]
    fn places_sort_as_a_comparison_sort_does() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |below: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % below
        };
        let keys: Vec<(u32, Vec<u8>)> = (0..3000)
            .map(|_| {
                let group = [0, 1, 300, 70_000, u32::MAX][next(5) as usize];
                let len = next(24) as usize;
                let bytes = (0..len).map(|_| b"ab\xff"[next(3) as usize]).collect();
                (group, bytes)
            })
            .collect();
        let places = places(
            &keys,
            |key| key.0,
            |key| &key.1,
            |a, b| keys[a].1.cmp(&keys[b].1).then(a.cmp(&b)),
        );
        let mut expected: Vec<usize> = (0..keys.len()).collect();
        expected.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));
        let sorted: Vec<usize> = places.iter().map(|place| place.index as usize).collect();
        assert_eq!(sorted, expected);
    }

    /// Items are taken in the places' order, and only those the places name.
    #[test]
    fn items_are_taken_in_the_places_order() {
        let items = vec!["c", "a", "b", "a2"];
        let mut places = places(
            &items,
            |_| 0,
            |item| &item.as_bytes()[..1],
            |a, b| a.cmp(&b),
        );
        assert_eq!(take_in_order(items.clone(), &places), ["a", "a2", "b", "c"]);
        places.dedup_by(|later, kept| later.order == kept.order);
        assert_eq!(take_in_order(items, &places), ["a", "b", "c"]);
    }
}
