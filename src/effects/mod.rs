//! Effect handlers: git cache/prepare/push, containers, the JSONL agent driver.

pub mod git;
