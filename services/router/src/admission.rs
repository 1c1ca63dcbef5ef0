//! Admission control with priority levels.
//!
//! The router holds at most `max_inflight` requests. The last slots are
//! kept for high-priority traffic: normal requests may fill the router only
//! up to `normal_limit`, low-priority ones up to `low_limit`. Beyond its
//! limit a request is refused at once (RESOURCE_EXHAUSTED / HTTP 429) with
//! no work done.
//!
//! Priority comes from the request parameter `priority`, as Triton reads
//! it: 1 is the highest level, 0 or absent is the default (normal), 2 is
//! normal too, and 3 or more is low.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use shamal_proto::inference::InferParameter;
use shamal_proto::inference::infer_parameter::ParameterChoice;
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn label(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// The request's priority; INVALID_ARGUMENT for a value that is not a
    /// non-negative integer.
    pub fn of(parameters: &HashMap<String, InferParameter>) -> Result<Priority, Status> {
        let Some(choice) = parameters
            .get("priority")
            .and_then(|parameter| parameter.parameter_choice.as_ref())
        else {
            return Ok(Priority::Normal);
        };
        let level = match choice {
            ParameterChoice::Uint64Param(level) => *level,
            ParameterChoice::Int64Param(level) if *level >= 0 => *level as u64,
            ParameterChoice::StringParam(text) => text.trim().parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "request parameter 'priority' must be a non-negative integer, not '{text}'"
                ))
            })?,
            _ => {
                return Err(Status::invalid_argument(
                    "request parameter 'priority' must be a non-negative integer",
                ));
            }
        };
        Ok(match level {
            1 => Priority::High,
            0 | 2 => Priority::Normal,
            _ => Priority::Low,
        })
    }
}

pub struct Admission {
    inflight: Arc<AtomicUsize>,
    high_limit: usize,
    normal_limit: usize,
    low_limit: usize,
}

/// One admitted request; frees its slot when dropped.
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// `reserve_percent` of `max_inflight` is kept for high priority;
    /// low priority may use at most `low_percent` of it.
    pub fn new(max_inflight: usize, reserve_percent: u8, low_percent: u8) -> Admission {
        let share = |percent: u8| (max_inflight * usize::from(percent.min(100)) / 100).max(1);
        let normal_limit = share(100u8.saturating_sub(reserve_percent));
        Admission {
            inflight: Arc::new(AtomicUsize::new(0)),
            high_limit: max_inflight.max(1),
            normal_limit,
            low_limit: share(low_percent).min(normal_limit),
        }
    }

    pub fn try_admit(&self, priority: Priority) -> Option<Permit> {
        let limit = match priority {
            Priority::High => self.high_limit,
            Priority::Normal => self.normal_limit,
            Priority::Low => self.low_limit,
        };
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |inflight| {
                (inflight < limit).then_some(inflight + 1)
            })
            .ok()
            .map(|_| Permit(self.inflight.clone()))
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_priority_gets_the_reserved_slots() {
        let admission = Admission::new(10, 20, 50);
        let low: Vec<_> = (0..5)
            .map(|_| admission.try_admit(Priority::Low).expect("low fits"))
            .collect();
        assert!(
            admission.try_admit(Priority::Low).is_none(),
            "low stops at 50%"
        );
        let normal: Vec<_> = (0..3)
            .map(|_| admission.try_admit(Priority::Normal).expect("normal fits"))
            .collect();
        assert!(
            admission.try_admit(Priority::Normal).is_none(),
            "normal stops at 80%"
        );
        let high: Vec<_> = (0..2)
            .map(|_| admission.try_admit(Priority::High).expect("high fits"))
            .collect();
        assert!(admission.try_admit(Priority::High).is_none(), "full");
        assert_eq!(admission.inflight(), 10);
        drop((low, normal, high));
        assert_eq!(admission.inflight(), 0, "permits free their slots");
    }

    #[test]
    fn priority_is_read_as_triton_does() {
        let of = |choice: Option<ParameterChoice>| {
            let mut parameters = HashMap::new();
            if let Some(choice) = choice {
                parameters.insert(
                    "priority".to_owned(),
                    InferParameter {
                        parameter_choice: Some(choice),
                    },
                );
            }
            Priority::of(&parameters)
        };
        assert_eq!(of(None).unwrap(), Priority::Normal);
        assert_eq!(
            of(Some(ParameterChoice::Uint64Param(1))).unwrap(),
            Priority::High
        );
        assert_eq!(
            of(Some(ParameterChoice::Int64Param(0))).unwrap(),
            Priority::Normal
        );
        assert_eq!(
            of(Some(ParameterChoice::StringParam("5".into()))).unwrap(),
            Priority::Low
        );
        let status = of(Some(ParameterChoice::BoolParam(true))).unwrap_err();
        assert!(status.message().contains("priority"));
        assert!(of(Some(ParameterChoice::Int64Param(-1))).is_err());
    }
}
