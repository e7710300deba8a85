//! Binding device threads to cores. When a process runs more device threads than it may use
//! cores, the operating system moves them between cores as it likes, and where it puts them
//! decides the step: two pipeline stages' partners on one core serialise (DP2×PP2 over 4
//! micro-batches, 4 threads on 2 cores: 31–40 ms a step unbound, 38 ms with both of a stage's
//! threads on one core, 31–34 ms bound round-robin; docs/plan.md, session 11). Bound
//! round-robin by device id, the threads of one stage or one collective group (consecutive
//! ranks) land on different cores, and the schedule is the one `meshflow plan` simulates.

/// The cores this process may run on (its affinity mask, as `taskset`, SLURM or a launcher set
/// it), in increasing order; empty where the platform does not say (then nothing is bound).
pub fn allowed_cores() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bit set the call fills; its size is passed with it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: as above; pid 0 is the calling thread.
        if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
            return Vec::new();
        }
        // SAFETY: reading bits of the set the call filled.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Vec::new()
    }
}

/// The core device thread `device` is bound to when `cores` are shared out round-robin.
pub fn core_for(device: u32, cores: &[usize]) -> Option<usize> {
    (!cores.is_empty()).then(|| cores[device as usize % cores.len()])
}

/// Binds the calling thread to `core`; false where that failed or the platform cannot.
pub fn bind_current_thread(core: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bit set; the call reads `size` bytes of it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        if core >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: `core` is inside the set (checked above).
        unsafe { libc::CPU_SET(core, &mut set) };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: pid 0 is the calling thread; `set` outlives the call.
        unsafe { libc::sched_setaffinity(0, size, &set) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = core;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_go_round_robin_over_the_allowed_cores() {
        let cores = [2, 5];
        let bound: Vec<_> = (0..5).map(|device| core_for(device, &cores)).collect();
        assert_eq!(bound, [Some(2), Some(5), Some(2), Some(5), Some(2)]);
        assert_eq!(core_for(3, &[]), None);
    }

    #[test]
    fn a_thread_binds_to_an_allowed_core_and_stays_there() {
        let allowed = allowed_cores();
        if cfg!(target_os = "linux") {
            assert!(!allowed.is_empty(), "Linux reports the affinity mask");
        }
        let Some(&last) = allowed.last() else { return };
        let seen = std::thread::spawn(move || {
            assert!(bind_current_thread(last));
            allowed_cores()
        })
        .join()
        .unwrap();
        assert_eq!(seen, [last], "the bound thread's mask is its one core");
        assert!(!bind_current_thread(usize::MAX), "a core past the set is refused");
    }
}
