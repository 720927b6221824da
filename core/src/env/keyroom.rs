//! `keyroom`: a sparse-reward grid with two rooms split by a wall with a locked door.
//! The agent starts in the left room with a key somewhere in it; the goal is in the
//! right room. Reward is 1 at the goal and 0 everywhere else, so an agent without
//! intrinsic reward rarely stumbles on it in larger rooms. Each step may emit a short
//! English event text ("you pick up the key", "the door is locked", ...).
//!
//! Observation (14 floats): the agent's position scaled by the room size, the offsets
//! from the agent to the key (0 once carried), the door and the goal, whether the
//! agent carries the key, whether the door is open, and the four neighbouring cells'
//! blocking flags (north, east, south, west). Each offset `d`, in cells along one
//! axis, is squashed to `d / (|d| + 1)`: 0 when aligned, ±0.5 one cell away, towards
//! ±1 far off. The last cells before a target, where the policy must turn, are as far
//! apart as the inputs can be, at any room size; offsets scaled by the room size put
//! them 1/size apart, which a small network learns slowly and unreliably.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Env, EnvSpec, StepOutcome};

/// Length of the observation.
pub const OBS_DIM: usize = 14;

/// Actions: move north, east, south, west, or search in place.
pub const ACTIONS: [&str; 5] = ["north", "east", "south", "west", "search"];

pub const TEXT_PICK_UP_KEY: &str = "you pick up the key";
pub const TEXT_DOOR_LOCKED: &str = "the door is locked";
pub const TEXT_UNLOCK_DOOR: &str = "you unlock the door with the key";
pub const TEXT_THROUGH_DOOR: &str = "you walk through the doorway";
pub const TEXT_BUMP_WALL: &str = "you bump into a wall";
pub const TEXT_SEARCH: &str = "you search the floor but find nothing";
pub const TEXT_GOAL: &str = "you reach the goal";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Floor,
    Wall,
    LockedDoor,
    OpenDoor,
    Goal,
}

pub struct KeyRoom {
    size: usize,
    limit: u32,
    cells: Vec<Cell>,
    agent: (usize, usize),
    door: (usize, usize),
    goal: (usize, usize),
    key: Option<(usize, usize)>,
    has_key: bool,
    steps: u32,
}

impl KeyRoom {
    pub fn new(size: usize, limit: Option<u32>) -> Self {
        let side = size + 2;
        Self {
            size,
            limit: limit.unwrap_or((4 * size * size) as u32),
            cells: vec![Cell::Floor; side * side],
            agent: (1, 1),
            door: (1, 1),
            goal: (1, 1),
            key: None,
            has_key: false,
            steps: 0,
        }
    }

    fn side(&self) -> usize {
        self.size + 2
    }

    fn idx(&self, (x, y): (usize, usize)) -> usize {
        y * self.side() + x
    }

    /// Column of the dividing wall.
    fn wall_x(&self) -> usize {
        self.size.div_ceil(2)
    }

    fn write_obs(&self, obs: &mut [f32]) {
        let scale = 1.0 / self.size as f32;
        let (ax, ay) = (self.agent.0 as f32, self.agent.1 as f32);
        let rel = |p: (usize, usize)| (squash(p.0 as f32 - ax), squash(p.1 as f32 - ay));
        let (kx, ky) = self.key.map_or((0.0, 0.0), rel);
        let (dx, dy) = rel(self.door);
        let (gx, gy) = rel(self.goal);
        let blocked = |x: usize, y: usize| match self.cells[self.idx((x, y))] {
            Cell::Wall | Cell::LockedDoor => 1.0,
            _ => 0.0,
        };
        let (x, y) = self.agent;
        obs.copy_from_slice(&[
            ax * scale,
            ay * scale,
            kx,
            ky,
            dx,
            dy,
            gx,
            gy,
            if self.has_key { 1.0 } else { 0.0 },
            if self.cells[self.idx(self.door)] == Cell::OpenDoor {
                1.0
            } else {
                0.0
            },
            blocked(x, y - 1),
            blocked(x + 1, y),
            blocked(x, y + 1),
            blocked(x - 1, y),
        ]);
    }

    /// The scripted solver's action: walk to the key, then to the cell west of the
    /// door, east to unlock it and go through, then to the goal (each walk along x
    /// first, then y; both rooms are open floor).
    pub fn expert_action(&self) -> usize {
        let toward = |(x, y): (usize, usize), (tx, ty): (usize, usize)| {
            if x < tx {
                1
            } else if x > tx {
                3
            } else if y < ty {
                2
            } else if y > ty {
                0
            } else {
                4
            }
        };
        let before_door = (self.door.0 - 1, self.door.1);
        if let Some(key) = self.key {
            return toward(self.agent, key);
        }
        if self.agent.0 <= self.door.0 {
            if self.agent == before_door || self.agent == self.door {
                return 1; // unlock, walk into the doorway, step out of it
            }
            return toward(self.agent, before_door);
        }
        toward(self.agent, self.goal)
    }

    /// An ASCII picture of the grid (`@` agent, `k` key, `+` locked door, `/` open
    /// door, `>` goal, `#` wall).
    pub fn render(&self) -> String {
        let side = self.side();
        let mut out = String::with_capacity(side * (side + 1));
        for y in 0..side {
            for x in 0..side {
                let ch = if (x, y) == self.agent {
                    '@'
                } else if self.key == Some((x, y)) {
                    'k'
                } else {
                    match self.cells[self.idx((x, y))] {
                        Cell::Floor => '.',
                        Cell::Wall => '#',
                        Cell::LockedDoor => '+',
                        Cell::OpenDoor => '/',
                        Cell::Goal => '>',
                    }
                };
                out.push(ch);
            }
            out.push('\n');
        }
        out
    }
}

/// An offset in cells mapped into (-1, 1), one cell from aligned at ±0.5.
fn squash(d: f32) -> f32 {
    d / (d.abs() + 1.0)
}

impl Env for KeyRoom {
    fn spec(&self) -> EnvSpec {
        EnvSpec {
            obs_dim: OBS_DIM,
            num_actions: ACTIONS.len(),
            has_text: true,
            max_episode_steps: self.limit,
            fields: Vec::new(),
        }
    }

    fn render_text(&self) -> Option<String> {
        Some(self.render())
    }

    fn reset(&mut self, seed: u64, obs: &mut [f32]) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let side = self.side();
        let wx = self.wall_x();
        for y in 0..side {
            for x in 0..side {
                let border = x == 0 || y == 0 || x == side - 1 || y == side - 1;
                let i = self.idx((x, y));
                self.cells[i] = if border || x == wx {
                    Cell::Wall
                } else {
                    Cell::Floor
                };
            }
        }
        let door = (wx, rng.random_range(1..=self.size));
        let i = self.idx(door);
        self.cells[i] = Cell::LockedDoor;
        self.door = door;
        let goal = (
            rng.random_range(wx + 1..=self.size),
            rng.random_range(1..=self.size),
        );
        let i = self.idx(goal);
        self.cells[i] = Cell::Goal;
        self.goal = goal;
        let left = |rng: &mut SmallRng| (rng.random_range(1..wx), rng.random_range(1..=self.size));
        self.agent = left(&mut rng);
        let mut key = left(&mut rng);
        while key == self.agent {
            key = left(&mut rng);
        }
        self.key = Some(key);
        self.has_key = false;
        self.steps = 0;
        self.write_obs(obs);
    }

    fn step(&mut self, action: usize, obs: &mut [f32], text: &mut String) -> StepOutcome {
        text.clear();
        self.steps += 1;
        let (x, y) = self.agent;
        let target = match action {
            0 => Some((x, y - 1)),
            1 => Some((x + 1, y)),
            2 => Some((x, y + 1)),
            3 => Some((x - 1, y)),
            _ => None,
        };
        let mut out = StepOutcome::default();
        match target {
            None => text.push_str(TEXT_SEARCH),
            Some(t) => {
                let ti = self.idx(t);
                match self.cells[ti] {
                    Cell::Wall => text.push_str(TEXT_BUMP_WALL),
                    Cell::LockedDoor if self.has_key => {
                        self.cells[ti] = Cell::OpenDoor;
                        text.push_str(TEXT_UNLOCK_DOOR);
                    }
                    Cell::LockedDoor => text.push_str(TEXT_DOOR_LOCKED),
                    Cell::OpenDoor => {
                        self.agent = t;
                        text.push_str(TEXT_THROUGH_DOOR);
                    }
                    Cell::Goal => {
                        self.agent = t;
                        text.push_str(TEXT_GOAL);
                        out.reward = 1.0;
                        out.terminated = true;
                        out.success = true;
                    }
                    Cell::Floor => {
                        self.agent = t;
                        if self.key == Some(t) {
                            self.key = None;
                            self.has_key = true;
                            text.push_str(TEXT_PICK_UP_KEY);
                        }
                    }
                }
            }
        }
        out.truncated = !out.terminated && self.steps >= self.limit;
        self.write_obs(obs);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expert_solves_every_room() {
        for size in [3, 5, 15] {
            for seed in 0..50 {
                let t = crate::env::replay::keyroom_expert(size, None, seed)
                    .unwrap_or_else(|e| panic!("size {size}: {e}"));
                assert!(t.steps.len() <= 4 * size * size);
            }
        }
    }

    /// Walks to `to` one axis at a time, returning the texts seen.
    fn walk(env: &mut KeyRoom, to: (usize, usize), obs: &mut [f32]) -> Vec<String> {
        let mut texts = Vec::new();
        let mut text = String::new();
        for _ in 0..100 {
            let (x, y) = env.agent;
            if (x, y) == to {
                break;
            }
            let a = if x < to.0 {
                1
            } else if x > to.0 {
                3
            } else if y < to.1 {
                2
            } else {
                0
            };
            env.step(a, obs, &mut text);
            texts.push(text.clone());
        }
        texts
    }

    #[test]
    fn scripted_solution_reaches_the_goal() {
        for seed in 0..20 {
            let mut env = KeyRoom::new(5, None);
            let mut obs = vec![0.0; env.spec().obs_dim];
            env.reset(seed, &mut obs);
            let key = env.key.unwrap();
            let texts = walk(&mut env, key, &mut obs);
            assert_eq!(texts.last().unwrap(), TEXT_PICK_UP_KEY);
            assert_eq!(obs[8], 1.0, "carries the key");
            assert_eq!((obs[2], obs[3]), (0.0, 0.0), "no key left in the room");
            let door_i = env
                .cells
                .iter()
                .position(|c| *c == Cell::LockedDoor)
                .unwrap();
            let door = (door_i % env.side(), door_i / env.side());
            walk(&mut env, (door.0 - 1, door.1), &mut obs);
            let mut text = String::new();
            assert_eq!((obs[4], obs[5]), (0.5, 0.0), "the door is one cell east");
            assert_eq!(obs[11], 1.0, "the locked door blocks the way east");
            env.step(1, &mut obs, &mut text);
            assert_eq!(text, TEXT_UNLOCK_DOOR);
            assert_eq!(
                (obs[9], obs[11]),
                (1.0, 0.0),
                "the door is open and passable"
            );
            env.step(1, &mut obs, &mut text);
            assert_eq!(text, TEXT_THROUGH_DOOR);
            let goal_i = env.cells.iter().position(|c| *c == Cell::Goal).unwrap();
            let goal = (goal_i % env.side(), goal_i / env.side());
            let texts = walk(&mut env, goal, &mut obs);
            assert_eq!(
                texts.last().unwrap(),
                TEXT_GOAL,
                "seed {seed}\n{}",
                env.render()
            );
        }
    }

    #[test]
    fn offsets_one_cell_apart_stay_far_apart_in_any_room() {
        assert_eq!(squash(0.0), 0.0);
        assert_eq!((squash(1.0), squash(-1.0)), (0.5, -0.5));
        for far in [3.0, 14.0, 40.0] {
            assert!(
                squash(far) - squash(far - 1.0) > 0.0,
                "still ordered at {far}"
            );
            assert!(squash(far) < 1.0 && squash(-far) > -1.0);
        }
        // Aligned versus one cell off is the widest gap on the axis.
        assert!(squash(1.0) - squash(0.0) > squash(2.0) - squash(1.0));
    }

    #[test]
    fn locked_door_and_walls_block() {
        let mut env = KeyRoom::new(5, None);
        let mut obs = vec![0.0; env.spec().obs_dim];
        env.reset(1, &mut obs);
        env.key = None;
        let door_i = env
            .cells
            .iter()
            .position(|c| *c == Cell::LockedDoor)
            .unwrap();
        let door = (door_i % env.side(), door_i / env.side());
        walk(&mut env, (door.0 - 1, door.1), &mut obs);
        let mut text = String::new();
        let out = env.step(1, &mut obs, &mut text);
        assert_eq!(text, TEXT_DOOR_LOCKED);
        assert_eq!(out.reward, 0.0);
        assert_eq!(env.agent, (door.0 - 1, door.1));
        walk(&mut env, (1, 1), &mut obs);
        env.step(0, &mut obs, &mut text);
        assert_eq!(text, TEXT_BUMP_WALL);
    }

    #[test]
    fn truncates_at_the_step_limit() {
        let mut env = KeyRoom::new(4, Some(3));
        let mut obs = vec![0.0; env.spec().obs_dim];
        env.reset(0, &mut obs);
        let mut text = String::new();
        let outs: Vec<_> = (0..3).map(|_| env.step(4, &mut obs, &mut text)).collect();
        assert!(!outs[1].truncated && outs[2].truncated);
        assert_eq!(text, TEXT_SEARCH);
    }
}
