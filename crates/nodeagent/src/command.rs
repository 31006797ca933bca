//! The command line a container runs, built the way kubelet builds it.
//!
//! There are no images here, so the image entrypoint is `--binary`: a container
//! without `command` runs `--binary` with its `args`; a container whose `command`
//! names `disparo` (bare or as a path ending in `/disparo`, as a chart would write
//! it) runs `--binary` in its place; any other `command` runs as written, so
//! `/bin/sh -c ...` works in tests. `$(VAR)` references are expanded from the
//! container's resolved environment with Kubernetes' rules.

use std::{collections::HashMap, path::Path, path::PathBuf};

use k8s_openapi::api::core::v1::Container;

/// The name by which a pod spec refers to the image entrypoint we substitute.
pub(crate) const ENTRYPOINT_NAME: &str = "disparo";

/// What to execute for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// The executable: `--binary` or the container's own `command[0]`.
    pub program: PathBuf,
    /// Everything after the program: the rest of `command`, then `args`.
    pub args: Vec<String>,
}

/// Builds the command line for `container`, expanding `$(VAR)` references from `env`
/// (the container's final environment), with `binary` standing in for the image
/// entrypoint.
pub fn command_line(container: &Container, env: &HashMap<String, String>, binary: &Path) -> CommandLine {
    let expand_all = |items: Option<&Vec<String>>| -> Vec<String> {
        items.map(|items| items.iter().map(|item| expand(item, env)).collect()).unwrap_or_default()
    };
    let command = expand_all(container.command.as_ref());
    let args = expand_all(container.args.as_ref());
    let mut command = command.into_iter();
    match command.next() {
        None => CommandLine { program: binary.to_path_buf(), args },
        Some(first) => {
            let program = if names_entrypoint(&first) { binary.to_path_buf() } else { PathBuf::from(first) };
            CommandLine { program, args: command.chain(args).collect() }
        }
    }
}

/// Whether a `command[0]` means "the disparo binary in the image".
fn names_entrypoint(program: &str) -> bool {
    Path::new(program).file_name().is_some_and(|name| name == ENTRYPOINT_NAME)
}

/// Expands `$(VAR)` references in `input` as Kubernetes does
/// (`third_party/forked/golang/expansion`): a defined variable is replaced by its
/// value, an undefined one is left as written, `$$` is an escaped `$`, and a `$`
/// not starting a reference stays as it is.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match after.chars().next() {
            // A trailing `$` is kept as is.
            None => {
                out.push('$');
                rest = after;
            }
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after.find(')') {
                Some(close) => {
                    let name = &after[1..close];
                    match vars.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 1..];
                }
                // An unterminated reference is kept literally.
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(other) => {
                out.push('$');
                out.push(other);
                rest = &after[other.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HashMap<String, String> {
        [("INDEX", "2"), ("NAME", "camp-a"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_like_kubernetes() {
        let cases = [
            ("plain", "plain"),
            ("$(INDEX)", "2"),
            ("batch-$(INDEX)-of-$(NAME)", "batch-2-of-camp-a"),
            ("$(EMPTY)x", "x"),
            ("$(MISSING)", "$(MISSING)"),
            ("$$(INDEX)", "$(INDEX)"),
            ("$$$(INDEX)", "$2"),
            ("$$", "$"),
            ("$", "$"),
            ("a$", "a$"),
            ("$INDEX", "$INDEX"),
            ("$(INDEX", "$(INDEX"),
            ("$()", "$()"),
            ("€$(INDEX)€", "€2€"),
            ("$€", "$€"),
        ];
        for (input, expected) in cases {
            assert_eq!(expand(input, &vars()), expected, "input {input:?}");
        }
    }

    fn container(command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        let owned = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Container { name: "sender".into(), command: command.map(owned), args: args.map(owned), ..Default::default() }
    }

    #[test]
    fn builds_command_lines() {
        let binary = Path::new("/opt/bin/disparo-dev");
        let line = |program: &str, args: &[&str]| CommandLine {
            program: PathBuf::from(program),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        let cases = [
            // No command: the image entrypoint (our binary) runs with args.
            (
                container(None, Some(&["send", "--index", "$(INDEX)"])),
                line("/opt/bin/disparo-dev", &["send", "--index", "2"]),
            ),
            (container(None, None), line("/opt/bin/disparo-dev", &[])),
            (container(Some(&[]), Some(&["send"])), line("/opt/bin/disparo-dev", &["send"])),
            // `disparo` named by bare name or path is replaced by the binary.
            (container(Some(&["disparo", "send"]), Some(&["--x"])), line("/opt/bin/disparo-dev", &["send", "--x"])),
            (container(Some(&["/usr/local/bin/disparo"]), Some(&["send"])), line("/opt/bin/disparo-dev", &["send"])),
            // Anything else runs as written.
            (
                container(Some(&["/bin/sh", "-c", "echo $JOB_COMPLETION_INDEX $(NAME)"]), None),
                line("/bin/sh", &["-c", "echo $JOB_COMPLETION_INDEX camp-a"]),
            ),
            (container(Some(&["/usr/bin/disparo-other"]), None), line("/usr/bin/disparo-other", &[])),
        ];
        for (container, expected) in cases {
            assert_eq!(command_line(&container, &vars(), binary), expected, "{container:?}");
        }
    }
}
