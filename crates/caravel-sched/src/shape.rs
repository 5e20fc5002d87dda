//! Request shapes, for remembering within one cycle what was learnt about one kind of ask
//! (it fits nowhere; no victims make room for it). A long queue holds many jobs of few
//! shapes, and the scheduler looks each job up once per cycle, so a lookup must not build
//! the shape: it hashes the request in place and compares it with the stored shape.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use caravel_core::resources::TaskResources;

/// CPU, memory and the GPU ask (models in preference order without repeats, count, milli).
pub(crate) type Shape = (u64, u64, Option<(Vec<String>, u32, Option<u32>)>);

pub(crate) fn shape(r: &TaskResources) -> Shape {
    (
        r.cpu_milli,
        r.memory_bytes,
        r.gpu.as_ref().map(|g| {
            (
                g.models_iter().map(str::to_string).collect(),
                g.count,
                g.milli,
            )
        }),
    )
}

/// FNV-1a: fixed (so runs are reproducible) and cheap on the few short fields of a shape.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Equal shapes give equal prints; unequal ones almost never collide, and a collision
/// only costs a comparison (`same`).
fn print(r: &TaskResources) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    r.cpu_milli.hash(&mut h);
    r.memory_bytes.hash(&mut h);
    match &r.gpu {
        None => 0u8.hash(&mut h),
        Some(g) => {
            1u8.hash(&mut h);
            for m in g.models_iter() {
                m.hash(&mut h);
            }
            g.count.hash(&mut h);
            g.milli.hash(&mut h);
        }
    }
    h.finish()
}

fn same(s: &Shape, r: &TaskResources) -> bool {
    s.0 == r.cpu_milli
        && s.1 == r.memory_bytes
        && match (&s.2, &r.gpu) {
            (None, None) => true,
            (Some((models, count, milli)), Some(g)) => {
                *count == g.count
                    && *milli == g.milli
                    && models.iter().map(String::as_str).eq(g.models_iter())
            }
            _ => false,
        }
}

/// A map from (shape of a request, `K`) to `V`.
pub(crate) struct ShapeMemo<K, V> {
    m: HashMap<(u64, K), Vec<(Shape, V)>>,
}

impl<K: Hash + Eq, V> Default for ShapeMemo<K, V> {
    fn default() -> Self {
        ShapeMemo { m: HashMap::new() }
    }
}

impl<K: Hash + Eq, V> ShapeMemo<K, V> {
    pub(crate) fn get(&self, r: &TaskResources, k: K) -> Option<&V> {
        self.m
            .get(&(print(r), k))?
            .iter()
            .find(|(s, _)| same(s, r))
            .map(|(_, v)| v)
    }

    pub(crate) fn insert(&mut self, r: &TaskResources, k: K, v: V) {
        let slot = self.m.entry((print(r), k)).or_default();
        match slot.iter_mut().find(|(s, _)| same(s, r)) {
            Some(e) => e.1 = v,
            None => slot.push((shape(r), v)),
        }
    }

    pub(crate) fn get_or_insert_with(
        &mut self,
        r: &TaskResources,
        k: K,
        f: impl FnOnce() -> V,
    ) -> &V {
        let slot = self.m.entry((print(r), k)).or_default();
        let i = match slot.iter().position(|(s, _)| same(s, r)) {
            Some(i) => i,
            None => {
                slot.push((shape(r), f()));
                slot.len() - 1
            }
        };
        &slot[i].1
    }

    pub(crate) fn clear(&mut self) {
        self.m.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravel_core::resources::GpuRequest;

    fn ask(cpu: u64, gpu: Option<GpuRequest>) -> TaskResources {
        TaskResources {
            needs: Default::default(),
            cpu_milli: cpu,
            memory_bytes: 1 << 30,
            gpu,
        }
    }

    fn asks() -> Vec<TaskResources> {
        let h100 = GpuRequest::whole("H100", 1);
        let either = GpuRequest {
            any_of: vec!["A100".into()],
            ..h100.clone()
        };
        vec![
            ask(1000, None),
            ask(2000, None),
            TaskResources {
                memory_bytes: 2 << 30,
                ..ask(1000, None)
            },
            ask(1000, Some(h100.clone())),
            ask(1000, Some(GpuRequest::whole("H100", 2))),
            ask(1000, Some(GpuRequest::whole("A100", 1))),
            ask(1000, Some(either.clone())),
            ask(
                1000,
                Some(GpuRequest {
                    any_of: vec!["H100".into()],
                    ..GpuRequest::whole("A100", 1)
                }),
            ),
            ask(
                1000,
                Some(GpuRequest {
                    milli: Some(500),
                    ..h100.clone()
                }),
            ),
        ]
    }

    #[test]
    fn a_memo_keeps_apart_every_field_of_a_shape_and_ignores_repeated_models() {
        let asks = asks();
        let h100 = GpuRequest::whole("H100", 1);
        let mut m: ShapeMemo<u8, usize> = ShapeMemo::default();
        for (i, a) in asks.iter().enumerate() {
            assert_eq!(m.get(a, 0), None, "ask {i} before insertion");
            m.insert(a, 0, i);
        }
        for (i, a) in asks.iter().enumerate() {
            assert_eq!(m.get(a, 0), Some(&i), "ask {i}");
            assert_eq!(m.get(a, 1), None, "ask {i} under another key");
        }
        // The same models named twice are the same shape (as `models` lists them).
        let repeated = ask(
            1000,
            Some(GpuRequest {
                any_of: vec!["A100".into(), "H100".into(), "A100".into()],
                ..h100
            }),
        );
        assert_eq!(m.get(&repeated, 0), Some(&6));
        assert_eq!(*m.get_or_insert_with(&repeated, 0, || 99), 6);
        assert_eq!(*m.get_or_insert_with(&repeated, 2, || 99), 99);
        m.insert(&asks[0], 0, 42);
        assert_eq!(m.get(&asks[0], 0), Some(&42));
        m.clear();
        assert_eq!(m.get(&asks[0], 0), None);
    }

    #[test]
    fn shapes_that_share_a_print_stay_apart() {
        // Every other shape stored under one ask's print, as if they all collided.
        let asks = asks();
        for (i, a) in asks.iter().enumerate() {
            let mut m: ShapeMemo<(), usize> = ShapeMemo::default();
            let others = asks.iter().enumerate().filter(|(k, _)| *k != i);
            m.m.insert((print(a), ()), others.map(|(k, b)| (shape(b), k)).collect());
            assert_eq!(m.get(a, ()), None, "ask {i} matched another shape");
            m.insert(a, (), i);
            assert_eq!(m.get(a, ()), Some(&i));
            assert_eq!(m.m[&(print(a), ())].len(), asks.len());
        }
    }
}
