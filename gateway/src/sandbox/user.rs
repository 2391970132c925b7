//! Who the sandboxed command runs as.

use nix::unistd::{Gid, Uid, User};

use super::SandboxError;

#[derive(Debug, Clone)]
pub struct SandboxUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: std::path::PathBuf,
}

/// `--user` when given, else the invoking user of sudo, else `nobody`. Never root.
pub fn resolve(requested: Option<&str>) -> Result<SandboxUser, SandboxError> {
    let user = match requested {
        Some(spec) => lookup(spec)?,
        None => match (std::env::var("SUDO_UID"), std::env::var("SUDO_GID")) {
            (Ok(uid), Ok(gid)) => {
                let mut u = lookup(&uid)?;
                u.gid = Gid::from_raw(gid.parse().map_err(|_| {
                    SandboxError::User(format!("SUDO_GID `{gid}` is not a number"))
                })?);
                u
            }
            _ => lookup("nobody")?,
        },
    };
    if user.uid.is_root() {
        return Err(SandboxError::User(
            "the sandbox cannot run as root: pass --user with an unprivileged user".into(),
        ));
    }
    Ok(user)
}

fn lookup(spec: &str) -> Result<SandboxUser, SandboxError> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(spec),
    };
    match found {
        Ok(Some(u)) => Ok(SandboxUser {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
            home: u.dir,
        }),
        // A bare uid without a passwd entry is still a valid identity to drop to.
        Ok(None) if spec.parse::<u32>().is_ok() => {
            let uid: u32 = spec.parse().unwrap_or(u32::MAX);
            Ok(SandboxUser {
                name: spec.to_owned(),
                uid: Uid::from_raw(uid),
                gid: Gid::from_raw(uid),
                home: "/".into(),
            })
        }
        Ok(None) => Err(SandboxError::User(format!(
            "no such user `{spec}`: pass --user with an existing user name or uid"
        ))),
        Err(e) => Err(SandboxError::User(format!("looking up user `{spec}`: {e}"))),
    }
}
