//! `replay`: UI-S1's semi-online mode on expert trajectories. Each episode replays
//! one trajectory from a JSONL file (one per line: `{"num_actions": A, "steps":
//! [{"obs": [...], "action": a, "text": "..."}, ...]}`). The policy acts at every
//! step; the reward is 1 when its action is the expert's, else 0. On a mismatch a
//! patch puts the expert's action in its place, so the episode goes on along the
//! expert's path, while the patch budget lasts; after that a mismatch ends the
//! episode. A patched step reports the expert's action
//! (`StepOutcome::expert_action`), which the learner imitates. An episode that
//! reaches the trajectory's end is a success when no step needed a patch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::{Env, EnvSpec, StepOutcome};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertStep {
    pub obs: Vec<f32>,
    pub action: i64,
    /// The event text the expert's action produced (empty: none).
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertTrajectory {
    pub num_actions: usize,
    pub steps: Vec<ExpertStep>,
}

/// Reads and checks a JSONL file of expert trajectories.
pub fn load_trajectories(path: &Path) -> Result<Vec<ExpertTrajectory>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out: Vec<ExpertTrajectory> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| format!("{} line {}: {m}", path.display(), i + 1);
        let t: ExpertTrajectory = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        if t.steps.is_empty() || t.num_actions == 0 {
            return Err(at("a trajectory needs steps and num_actions".into()));
        }
        let d = t.steps[0].obs.len();
        if d == 0 || t.steps.iter().any(|s| s.obs.len() != d) {
            return Err(at("every observation needs the same non-zero length".into()));
        }
        if t.steps
            .iter()
            .any(|s| s.action < 0 || s.action as usize >= t.num_actions)
        {
            return Err(at(format!("an action is outside 0..{}", t.num_actions)));
        }
        if t.steps.iter().flat_map(|s| &s.obs).any(|x| !x.is_finite()) {
            return Err(at("an observation is not finite".into()));
        }
        if let Some(first) = out.first() {
            if first.num_actions != t.num_actions || first.steps[0].obs.len() != d {
                return Err(at("all trajectories need the same shapes".into()));
            }
        }
        out.push(t);
    }
    if out.is_empty() {
        return Err(format!("{} holds no trajectory", path.display()));
    }
    Ok(out)
}

/// One keyroom episode solved by the scripted solver (`KeyRoom::expert_action`),
/// recorded as an expert trajectory: the observation before each step, the action
/// and the event text it produced.
pub fn keyroom_expert(
    size: usize,
    limit: Option<u32>,
    seed: u64,
) -> Result<ExpertTrajectory, String> {
    let mut env = super::KeyRoom::new(size, limit);
    let spec = env.spec();
    let mut obs = vec![0.0f32; spec.obs_dim];
    let mut text = String::new();
    env.reset(seed, &mut obs);
    let mut steps = Vec::new();
    loop {
        let action = env.expert_action();
        let before = obs.clone();
        let out = env.step(action, &mut obs, &mut text);
        steps.push(ExpertStep {
            obs: before,
            action: action as i64,
            text: text.clone(),
        });
        if out.terminated || out.truncated {
            if !out.success {
                return Err(format!(
                    "the solver did not reach the goal in room {seed} (step limit too short?)"
                ));
            }
            return Ok(ExpertTrajectory {
                num_actions: spec.num_actions,
                steps,
            });
        }
    }
}

/// Each file is read once per process and shared by its environments.
fn shared(path: &Path) -> Result<Arc<Vec<ExpertTrajectory>>, String> {
    static CACHE: OnceLock<Mutex<HashMap<std::path::PathBuf, Arc<Vec<ExpertTrajectory>>>>> =
        OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("replay cache lock poisoned");
    if let Some(t) = cache.get(path) {
        return Ok(t.clone());
    }
    let t = Arc::new(load_trajectories(path)?);
    cache.insert(path.to_path_buf(), t.clone());
    Ok(t)
}

pub struct Replay {
    data: Arc<Vec<ExpertTrajectory>>,
    patches: u32,
    current: usize,
    t: usize,
    patches_left: u32,
    patched: bool,
}

impl Replay {
    /// The environment over the trajectories in `path`, with `patches` patches per
    /// episode.
    pub fn open(path: &Path, patches: u32) -> Result<Self, String> {
        Ok(Self {
            data: shared(path)?,
            patches,
            current: 0,
            t: 0,
            patches_left: patches,
            patched: false,
        })
    }

    fn trajectory(&self) -> &ExpertTrajectory {
        &self.data[self.current]
    }

    /// Steps of the current episode's expert trajectory.
    pub fn expert_len(&self) -> usize {
        self.trajectory().steps.len()
    }

    /// Trajectories in the file.
    pub fn trajectories(&self) -> usize {
        self.data.len()
    }
}

impl Env for Replay {
    fn spec(&self) -> EnvSpec {
        let longest = self.data.iter().map(|t| t.steps.len()).max().unwrap_or(1);
        EnvSpec {
            obs_dim: self.data[0].steps[0].obs.len(),
            num_actions: self.data[0].num_actions,
            has_text: self
                .data
                .iter()
                .any(|t| t.steps.iter().any(|s| !s.text.is_empty())),
            max_episode_steps: longest as u32,
            fields: Vec::new(),
        }
    }

    fn reset(&mut self, seed: u64, obs: &mut [f32]) {
        self.current = (seed % self.data.len() as u64) as usize;
        self.t = 0;
        self.patches_left = self.patches;
        self.patched = false;
        obs.copy_from_slice(&self.trajectory().steps[0].obs);
    }

    fn step(&mut self, action: usize, obs: &mut [f32], text: &mut String) -> StepOutcome {
        text.clear();
        // Through the field, not `trajectory()`, so the counters below stay writable.
        let step = &self.data[self.current].steps[self.t];
        let matched = action as i64 == step.action;
        let mut out = StepOutcome {
            reward: if matched { 1.0 } else { 0.0 },
            ..Default::default()
        };
        if !matched {
            if self.patches_left == 0 {
                // Off the expert's path with no patch left: the episode ends here.
                out.terminated = true;
                return out;
            }
            self.patches_left -= 1;
            self.patched = true;
            out.expert_action = Some(step.action as usize);
        }
        // The expert's action was taken (by the policy or by a patch).
        text.push_str(&step.text);
        self.t += 1;
        if self.t == self.trajectory().steps.len() {
            out.terminated = true;
            out.success = !self.patched;
        } else {
            obs.copy_from_slice(&self.trajectory().steps[self.t].obs);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &[&str]) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("spur-replay-{}-{k}.jsonl", std::process::id()));
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }

    const TRAJ: &str = r#"{"num_actions": 3, "steps": [{"obs": [0, 0], "action": 1, "text": "a"}, {"obs": [1, 0], "action": 2}, {"obs": [2, 0], "action": 0, "text": "done"}]}"#;

    #[test]
    fn rewards_matches_patches_then_ends() {
        let p = write(&[TRAJ]);
        let mut obs = [0.0f32; 2];
        let mut text = String::new();
        // Budget 1: one mismatch is patched, the second ends the episode.
        let mut env = Replay::open(&p, 1).unwrap();
        assert_eq!(env.spec().num_actions, 3);
        env.reset(5, &mut obs);
        let o = env.step(1, &mut obs, &mut text);
        assert_eq!((o.reward, o.terminated, text.as_str()), (1.0, false, "a"));
        assert_eq!(obs, [1.0, 0.0]);
        let o = env.step(0, &mut obs, &mut text); // wrong: patched with the expert's 2
        assert_eq!((o.reward, o.terminated), (0.0, false));
        assert_eq!(
            o.expert_action,
            Some(2),
            "the patch names the expert's action"
        );
        assert_eq!(obs, [2.0, 0.0], "the patch follows the expert's path");
        let o = env.step(1, &mut obs, &mut text); // wrong again, no patch left
        assert!(o.terminated && !o.success && o.reward == 0.0);

        // All matched: success at the end.
        env.reset(0, &mut obs);
        let outs: Vec<_> = [1, 2, 0]
            .iter()
            .map(|&a| env.step(a, &mut obs, &mut text))
            .collect();
        assert!(outs[2].terminated && outs[2].success);
        assert_eq!(text, "done");
        assert_eq!(outs.iter().map(|o| o.reward).sum::<f32>(), 3.0);
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let bad = [
            r#"{"num_actions": 3, "steps": []}"#,
            r#"{"num_actions": 2, "steps": [{"obs": [0], "action": 2}]}"#,
            r#"{"num_actions": 2, "steps": [{"obs": [0], "action": 1}, {"obs": [0, 1], "action": 1}]}"#,
            "not json",
        ];
        for line in bad {
            let p = write(&[line]);
            let err = load_trajectories(&p).unwrap_err();
            assert!(err.contains("line 1"), "{err}");
        }
        let p = write(&[
            TRAJ,
            r#"{"num_actions": 4, "steps": [{"obs": [0, 0], "action": 1}]}"#,
        ]);
        assert!(load_trajectories(&p).unwrap_err().contains("line 2"));
        assert!(load_trajectories(Path::new("/nonexistent/x.jsonl")).is_err());
    }
}
