//! What one schedule is made of, drawn from its seed: the runs the server queues (each with
//! the agent script its container plays), the runner's concurrency and the faults.

/// SplitMix64: a tiny generator whose output depends on the seed alone (no crate version,
/// no platform), so a seed replays byte for byte wherever it runs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1).max(1) as u64) as i64
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// How the agent's session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `finish completed`, then exit 0.
    Completed,
    /// `finish blocked`, then exit 0.
    Blocked,
    /// An `error` line, then exit 1.
    Crashed,
    /// Exit 0 without a finish.
    Silent,
}

/// What the agent in a run's container does, line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentScript {
    /// When the server queues the run (virtual ms).
    pub enqueue_at: i64,
    /// Plain progress lines before the ending.
    pub progress: u32,
    /// Error lines printed as fast as it can (the security issue's journal flood).
    pub flood: u32,
    /// The agent commits to its run branch before it ends.
    pub commits: bool,
    pub ending: Ending,
    /// Time between two lines (virtual ms).
    pub line_gap_ms: i64,
    /// The agent ignores the abort line and SIGTERM: only the kill after the grace ends it.
    pub ignores_abort: bool,
}

impl AgentScript {
    /// Every stdout line the agent prints, in order.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![r#"{"type":"starting"}"#.to_owned()];
        for i in 0..self.progress {
            lines.push(format!("working on step {i}"));
        }
        for i in 0..self.flood {
            lines.push(format!(r#"{{"type":"error","message":"flood {i}"}}"#));
        }
        match self.ending {
            Ending::Completed => {
                lines.push(r#"{"type":"finish","outcome":"completed","summary":"done"}"#.into())
            }
            Ending::Blocked => lines
                .push(r#"{"type":"finish","outcome":"blocked","summary":"needs a human"}"#.into()),
            Ending::Crashed => lines.push(r#"{"type":"error","message":"gave up"}"#.into()),
            Ending::Silent => {}
        }
        lines
    }

    /// The agent's exit code when nothing stops it.
    pub fn exit_code(&self) -> i32 {
        match self.ending {
            Ending::Crashed => 1,
            _ => 0,
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The runner process dies (SIGKILL) when it writes its `record`-th journal record of the
    /// schedule: before that record's flush, or after it and before its effects run.
    Crash { record: u32, before_flush: bool },
    /// The server answers nothing from `at` for `len` ms.
    Outage { at: i64, len: i64 },
    /// The git proxy answers 503 from `at` for `len` ms.
    GitFlaky { at: i64, len: i64 },
    /// The server's user cancels run `run` (index into the scenario's runs) at `at`; `force`:
    /// an admin force-cancel, which makes the run final on the server at once.
    Cancel { run: usize, at: i64, force: bool },
    /// SIGTERM at `at`: drain, with the drain deadline `deadline` ms later.
    Drain { at: i64, deadline: i64 },
    /// The answer to the `claim`-th claim call is lost after the server carried it out.
    LoseClaimAnswer { claim: u32 },
}

/// One schedule's world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub runs: Vec<AgentScript>,
    pub concurrency: usize,
    pub faults: Vec<Fault>,
    /// How long the server takes to answer one event call (a slow server makes the event
    /// sender lag the agent).
    pub event_call_ms: i64,
}

impl Scenario {
    /// The scenario of `seed` (what the named seeds and the README test command run).
    pub fn from_seed(seed: u64) -> Scenario {
        Scenario::generate(seed, false)
    }

    /// The scenario of `seed`; `wide`: up to five runs, concurrency three and six faults
    /// (the long mode's `WSR_SIM_WIDE=1`; its seeds are not the named ones).
    pub fn generate(seed: u64, wide: bool) -> Scenario {
        let (max_runs, max_faults, max_concurrency) = if wide { (5, 7, 3) } else { (3, 4, 2) };
        let mut rng = Rng::new(seed ^ 0x005E_ED0F_5C4E_D01E);
        let runs = (0..rng.range(1, max_runs))
            .map(|_| AgentScript {
                enqueue_at: rng.range(0, 8_000),
                progress: rng.range(0, 8) as u32,
                flood: if rng.chance(4) { 300 } else { 0 },
                commits: rng.chance(75),
                ending: match rng.below(10) {
                    0 => Ending::Blocked,
                    1 => Ending::Crashed,
                    2 => Ending::Silent,
                    _ => Ending::Completed,
                },
                line_gap_ms: rng.range(20, 1_500),
                ignores_abort: rng.chance(20),
            })
            .collect::<Vec<_>>();
        let mut faults = Vec::new();
        for _ in 0..rng.below(max_faults) {
            faults.push(match rng.below(6) {
                0 | 1 => Fault::Crash {
                    record: rng.range(1, 30) as u32,
                    before_flush: rng.chance(50),
                },
                2 => Fault::Outage {
                    at: rng.range(0, 40_000),
                    len: rng.range(1_000, 50_000),
                },
                3 => Fault::GitFlaky {
                    at: rng.range(0, 40_000),
                    len: rng.range(1_000, 60_000),
                },
                4 => Fault::Cancel {
                    run: rng.below(runs.len() as u64) as usize,
                    at: rng.range(0, 30_000),
                    force: rng.chance(30),
                },
                _ if rng.chance(50) => Fault::Drain {
                    at: rng.range(0, 40_000),
                    deadline: rng.range(0, 20_000),
                },
                _ => Fault::LoseClaimAnswer {
                    claim: rng.range(1, 4) as u32,
                },
            });
        }
        Scenario {
            concurrency: rng.range(1, max_concurrency) as usize,
            event_call_ms: if rng.chance(30) {
                rng.range(200, 800)
            } else {
                5
            },
            runs,
            faults,
        }
    }
}
