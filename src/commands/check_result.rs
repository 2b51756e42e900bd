//! One finding of `walrelay check`: passed, a warning or a failure, with
//! the SQL or setting that fixes it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub what: String,
    /// The SQL or setting that fixes it (for warnings and failures).
    pub fix: Option<String>,
}

impl Check {
    pub(super) fn pass(what: impl Into<String>) -> Self {
        Check {
            status: Status::Pass,
            what: what.into(),
            fix: None,
        }
    }
    pub(super) fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            status: Status::Fail,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
    pub(super) fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            status: Status::Warn,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}
