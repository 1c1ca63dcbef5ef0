//! candle's CPU compute threads, and the CPU worker's default: one thread
//! per model instance, one instance per core.
//!
//! candle 0.11 takes its CPU thread count from the environment, for the
//! whole process: `RAYON_NUM_THREADS` (read at every matrix product, which
//! splits into that many rayon tasks), else every physical core; and
//! `CANDLE_NUM_THREADS`, else the same, sizes the pool of element-wise
//! operations once, at its first use. That pool serves one caller at a time
//! and its threads spin at every operation's barrier: model instances
//! computing at once queue for it, and a spinning thread that loses its core
//! to the router, the load generator or another instance stalls the whole
//! forward pass. Measured on two vCPUs (`docs/benchmarks.md`, sentence
//! encoder at concurrency 32): router + gpu-worker reached 0.77 of the
//! in-process throughput with every core per instance and 0.97 with one
//! thread, and two single-threaded instances served 1.6 times what one
//! instance on both cores did. So a worker computing on the CPU defaults to
//! one thread and scales with instances; a CUDA worker keeps candle's
//! default, since its CPU only tokenizes and copies.

use candle_core::Device;

use crate::config::GpuWorkerConfig;
use crate::device;
use crate::spec::DevicePreference;

/// The variables candle reads its thread counts from.
const VARIABLES: [&str; 2] = ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"];

/// The thread count to set when the configuration names none: 1 on the
/// CPU, unless the environment already names a count (an operator's
/// `RAYON_NUM_THREADS` keeps working); none on CUDA, candle's default.
fn default_threads(on_cpu: bool, from_environment: Option<usize>) -> Option<usize> {
    (on_cpu && from_environment.is_none()).then_some(1)
}

/// `RAYON_NUM_THREADS` when it holds a count candle accepts (at least 1).
fn from_environment() -> Option<usize> {
    std::env::var(VARIABLES[0])
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|&threads| threads > 0)
}

/// Sets both variables to `threads`.
///
/// # Safety
///
/// No other thread may exist (see [`select_device`]).
#[allow(unsafe_code)]
unsafe fn apply(threads: usize) {
    for variable in VARIABLES {
        // SAFETY: the caller guarantees that this thread is the only one,
        // so nothing reads or writes the environment concurrently.
        unsafe { std::env::set_var(variable, threads.to_string()) };
    }
}

/// Selects the worker's device (as [`device::select`]) and sets candle's
/// CPU thread count for the process: `cpu_threads` when configured (before
/// the device is opened), else 1 when the device turns out to be the CPU
/// and `RAYON_NUM_THREADS` is not set.
///
/// # Safety
///
/// Sets environment variables, which Rust 2024 and POSIX allow only while
/// no other thread may read or write the environment: call it at the top
/// of `main`, before the async runtime or anything else starts a thread.
/// (Opening a CUDA device starts driver threads, but the default is only
/// applied when no device was opened.)
#[allow(unsafe_code)]
pub unsafe fn select_device(config: &GpuWorkerConfig) -> Result<Device, device::Error> {
    if let Some(threads) = config.cpu_threads {
        // SAFETY: forwarded from the caller; no device is open yet.
        unsafe { apply(threads) };
    }
    let device = device::select(config.device, config.cuda_device)?;
    if config.cpu_threads.is_none()
        && let Some(threads) = default_threads(!device.is_cuda(), from_environment())
    {
        // SAFETY: forwarded from the caller; the device is the CPU, so no
        // CUDA driver thread was started.
        unsafe { apply(threads) };
    }
    Ok(device)
}

/// For a program that embeds the worker (`shamal up`) and so opens its
/// device later, on its async runtime: applies the CPU worker's default,
/// one thread, now, when the device can only be the CPU (`cpu`, or `auto`
/// in a build without the `cuda` feature) and `RAYON_NUM_THREADS` is not
/// set. An `auto` worker that finds no GPU at run time keeps candle's
/// threads, and [`default_instances`] follows them.
///
/// # Safety
///
/// As [`select_device`]: no other thread may exist.
#[allow(unsafe_code)]
pub unsafe fn set_cpu_default(preference: DevicePreference) {
    let on_cpu = match preference {
        DevicePreference::Cpu => true,
        DevicePreference::Auto => !device::CUDA_COMPILED,
        DevicePreference::Cuda => false,
    };
    if let Some(threads) = default_threads(on_cpu, from_environment()) {
        // SAFETY: forwarded from the caller.
        unsafe { apply(threads) };
    }
}

/// The CPU threads candle computes with in this process.
pub fn current() -> usize {
    candle_core::utils::get_num_threads()
}

/// Instances per model version on a CPU worker when the configuration sets
/// none: the cores this process may use, one instance per [`current`]
/// threads, at least one. With the default single thread, one per core;
/// where candle's threads were left at every core (a program that embeds
/// the worker without [`select_device`]), one.
pub fn default_instances() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    instances_for(cores, current())
}

/// One instance per `threads` of the `cores`, at least one.
fn instances_for(cores: usize, threads: usize) -> usize {
    (cores / threads.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_worker_defaults_to_one_thread_unless_told_otherwise() {
        assert_eq!(default_threads(true, None), Some(1));
        assert_eq!(default_threads(true, Some(4)), None, "RAYON_NUM_THREADS");
        assert_eq!(default_threads(false, None), None, "CUDA keeps candle's");
    }

    #[test]
    fn one_instance_per_thread_count_of_the_cores_at_least_one() {
        // The default single thread: one instance per core.
        assert_eq!(instances_for(1, 1), 1);
        assert_eq!(instances_for(2, 1), 2);
        assert_eq!(instances_for(16, 1), 16);
        // Candle's threads left at every core: one instance.
        assert_eq!(instances_for(8, 8), 1);
        // An operator's RAYON_NUM_THREADS: the instances that fit, rounded down.
        assert_eq!(instances_for(8, 3), 2);
        assert_eq!(instances_for(8, 4), 2);
        // More threads than cores, or a count of 0: still one instance.
        assert_eq!(instances_for(2, 4), 1);
        assert_eq!(instances_for(4, 0), 4);
    }
}
