//! The autoscaler's decision, as a pure function of samples and time so that tests drive it
//! with a virtual clock.
//!
//! Every tick (100 ms) the controller records the requests in flight at the gateway for a
//! service (proxied plus held while no replica is ready). Up: the average over the last
//! `UP_WINDOW_MS` divided by the target concurrency per replica, acted on at once: a
//! sustained surge is answered within that window (Knative decides every 2 s over a 6 s
//! panic window, Ray Serve waits 30 s). Down: the most replicas wanted at any moment of the
//! last `scale_down_delay`, and at most one change per that delay, so steady load with
//! noise never flaps. Zero: after `scale_to_zero_after` with no request at all.

use std::collections::VecDeque;

use caravel_core::{Millis, ServiceSpec};

pub const TICK_MS: u64 = 100;
pub const UP_WINDOW_MS: i64 = 500;

#[derive(Debug, Clone, Default)]
pub struct Autoscaler {
    /// (time, requests in flight) over the up window.
    samples: VecDeque<(Millis, u64)>,
    /// (time, replicas the load wanted) over the scale-down delay; values decrease from
    /// front to back (a monotonic queue), so the front is the window's maximum.
    wanted: VecDeque<(Millis, u32)>,
    /// The count decided.
    pub replicas: u32,
    last_down: Option<Millis>,
    /// Last time a request arrived or was in flight.
    last_busy: Option<Millis>,
    /// When the count last went up (a decision, for the reaction-time benchmark).
    pub last_up_ms: Option<Millis>,
}

impl Autoscaler {
    /// Starts at `replicas` (what runs now), as if last busy `now`: a restarted server does
    /// not scale a service to zero before it has watched it idle.
    pub fn new(replicas: u32, now: Millis) -> Autoscaler {
        Autoscaler {
            replicas,
            last_busy: Some(now),
            ..Default::default()
        }
    }

    /// Records one sample and returns the replica count to run now.
    pub fn tick(&mut self, spec: &ServiceSpec, now: Millis, in_flight: u64, arrived: bool) -> u32 {
        if in_flight > 0 || arrived {
            self.last_busy = Some(now);
        }
        self.samples.push_back((now, in_flight));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| *t <= now - UP_WINDOW_MS)
        {
            self.samples.pop_front();
        }
        let avg = self.samples.iter().map(|s| s.1).sum::<u64>() as f64 / self.samples.len() as f64;
        let target = spec.target_concurrency.max(1) as f64;
        let mut want = (avg / target).ceil() as u32;
        if in_flight > 0 {
            // Someone is waiting: never fewer than one replica.
            want = want.max(1);
        }
        let want = want.clamp(spec.min_replicas, spec.max_replicas);
        let delay = spec.scale_down_delay_ms as i64;
        while self.wanted.back().is_some_and(|(_, w)| *w <= want) {
            self.wanted.pop_back();
        }
        self.wanted.push_back((now, want));
        while self.wanted.front().is_some_and(|(t, _)| *t < now - delay) {
            self.wanted.pop_front();
        }
        let window_max = self.wanted.front().map_or(want, |w| w.1);
        let idle_for = self.last_busy.map_or(i64::MAX, |t| now - t);
        if want > self.replicas {
            self.replicas = want;
            self.last_up_ms = Some(now);
        } else if spec.min_replicas == 0
            && self.replicas > 0
            && idle_for >= spec.scale_to_zero_after_ms as i64
        {
            self.replicas = 0;
            self.last_down = Some(now);
        } else if window_max < self.replicas && self.last_down.is_none_or(|t| now - t >= delay) {
            // Never below what the load wanted over the whole window, and never to zero
            // by this path (zero is for idleness alone).
            let floor = if spec.min_replicas == 0 && idle_for < spec.scale_to_zero_after_ms as i64 {
                1
            } else {
                spec.min_replicas
            };
            // The window's oldest samples are the tail of the last decline (the up window
            // smooths a drop over UP_WINDOW_MS): go straight to what the rest wanted, so
            // one change lands on the new level instead of stepping down once per delay.
            let settled = self
                .wanted
                .iter()
                .filter(|(t, _)| *t >= now - delay + UP_WINDOW_MS)
                .map(|w| w.1)
                .max()
                .unwrap_or(want);
            let next = settled.max(floor);
            if next < self.replicas {
                self.replicas = next;
                self.last_down = Some(now);
            }
        }
        self.replicas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        let mut s = ServiceSpec::simple("s", "x", &[]);
        s.target_concurrency = 4;
        s.max_replicas = 20;
        s.scale_down_delay_ms = 600_000;
        s.scale_to_zero_after_ms = 300_000;
        s
    }

    /// Drives the autoscaler for `ms` at constant load; returns the counts it decided.
    fn run(a: &mut Autoscaler, s: &ServiceSpec, t: &mut Millis, ms: i64, load: u64) -> Vec<u32> {
        let mut out = Vec::new();
        let end = *t + ms;
        while *t < end {
            *t += TICK_MS as i64;
            out.push(a.tick(s, *t, load, load > 0));
        }
        out
    }

    #[test]
    fn scales_up_within_the_up_window_of_a_step() {
        let s = spec();
        let mut a = Autoscaler::new(1, 0);
        let mut t = 0;
        run(&mut a, &s, &mut t, 10_000, 4);
        assert_eq!(a.replicas, 1);
        let step_at = t;
        let counts = run(&mut a, &s, &mut t, 2_000, 40);
        let first = counts.iter().position(|c| *c > 1).unwrap();
        assert!(
            (first as i64 + 1) * TICK_MS as i64 <= UP_WINDOW_MS,
            "first extra replica decided {} ms after the step",
            (first + 1) as u64 * TICK_MS
        );
        assert_eq!(a.replicas, 10);
        assert!(a.last_up_ms.unwrap() - step_at <= UP_WINDOW_MS);
    }

    #[test]
    fn scales_from_zero_on_the_first_request() {
        let s = spec();
        let mut a = Autoscaler::new(0, 0);
        let mut t = 0;
        run(&mut a, &s, &mut t, 1_000, 0);
        assert_eq!(a.replicas, 0);
        t += TICK_MS as i64;
        assert_eq!(a.tick(&s, t, 1, true), 1);
    }

    #[test]
    fn noisy_steady_load_changes_the_count_at_most_once_per_delay() {
        let s = spec();
        let mut a = Autoscaler::new(1, 0);
        let mut t = 0;
        let mut counts = Vec::new();
        // Load between 20 and 28 in flight (5 to 7 replicas), for an hour.
        let mut x: u64 = 7;
        for _ in 0..36_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let load = 20 + (x >> 33) % 9;
            t += TICK_MS as i64;
            counts.push((t, a.tick(&s, t, load, true)));
        }
        let changes: Vec<(Millis, u32)> = counts
            .windows(2)
            .filter(|w| w[0].1 != w[1].1)
            .map(|w| w[1])
            .collect();
        // Up to 7 in the first seconds, then never down (the window keeps the peaks).
        assert!(changes.iter().all(|c| c.0 < 5_000), "{changes:?}");
        assert_eq!(a.replicas, 7);
    }

    #[test]
    fn scales_down_after_the_delay_and_to_zero_after_idleness() {
        let s = spec();
        let mut a = Autoscaler::new(1, 0);
        let mut t = 0;
        run(&mut a, &s, &mut t, 5_000, 40);
        assert_eq!(a.replicas, 10);
        // Load drops to 2 replicas' worth: nothing changes before the delay.
        let c = run(&mut a, &s, &mut t, 590_000, 8);
        assert!(c.iter().all(|x| *x == 10));
        run(&mut a, &s, &mut t, 20_000, 8);
        assert_eq!(a.replicas, 2);
        // Idle: one replica stays until the idle period, then zero.
        let c = run(&mut a, &s, &mut t, 299_000, 0);
        assert!(c.iter().all(|x| *x >= 1), "not before the idle period");
        run(&mut a, &s, &mut t, 2_000, 0);
        assert_eq!(a.replicas, 0);
    }

    #[test]
    fn respects_min_and_max() {
        let mut s = spec();
        s.min_replicas = 2;
        s.max_replicas = 3;
        let mut a = Autoscaler::new(2, 0);
        let mut t = 0;
        run(&mut a, &s, &mut t, 2_000, 400);
        assert_eq!(a.replicas, 3);
        run(&mut a, &s, &mut t, 2_000_000, 0);
        assert_eq!(a.replicas, 2);
    }
}
