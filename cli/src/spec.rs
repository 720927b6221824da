//! `spur spec`: the env spec of a config as JSON (observation length, actions, and
//! the named fields of the flat observation with their offsets), what a TorchScript
//! policy's export script needs to know about the env it will read.

use clap::Args;
use serde_json::json;
use spur_core::env::EnvSpec;
use spur_env_bridge::env_spec;

use crate::ConfigArgs;

#[derive(Args)]
pub struct SpecArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: SpecArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let spec = env_spec(&config.env)?;
    println!("{}", serde_json::to_string_pretty(&to_json(&spec))?);
    Ok(())
}

fn to_json(spec: &EnvSpec) -> serde_json::Value {
    let mut offset = 0;
    let fields: Vec<_> = spec
        .fields
        .iter()
        .map(|f| {
            let field = json!({ "name": f.name, "shape": f.shape, "offset": offset });
            offset += f.size();
            field
        })
        .collect();
    json!({
        "obs_dim": spec.obs_dim,
        "num_actions": spec.num_actions,
        "has_text": spec.has_text,
        "max_episode_steps": spec.max_episode_steps,
        "fields": fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_core::env::ObsField;

    #[test]
    fn fields_carry_their_offsets() {
        let field = |name: &str, shape: Vec<usize>| ObsField {
            name: name.into(),
            shape,
        };
        let spec = EnvSpec {
            obs_dim: 9 + 27 + 4,
            num_actions: 5,
            has_text: true,
            max_episode_steps: 100,
            fields: vec![
                field("glyphs_crop", vec![3, 3]),
                field("blstats", vec![27]),
                field("message", vec![4]),
            ],
        };
        let j = to_json(&spec);
        assert_eq!(j["obs_dim"], 40);
        assert_eq!(j["num_actions"], 5);
        let offsets: Vec<_> = j["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [0, 9, 36]);
        assert_eq!(j["fields"][0]["shape"], json!([3, 3]));
    }
}
