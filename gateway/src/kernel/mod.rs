//! Loads the eBPF programs, writes the compiled policy into their maps, attaches them to the
//! sandbox cgroup and pins every link in bpffs.

mod batch;
mod clients;
mod events;
mod maps;
mod stale;
pub mod summary;
mod unix;

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, SockOps,
        links::{FdLink, PinnedLink},
    },
};

pub use clients::TunnelClients;
pub use events::{EventReader, add_unrecorded, lost_record, read_lost_mark, write_lost_mark};
pub use maps::{Compiled, PolicyMaps};
pub use stale::PinnedEvents;

use crate::policy::Policy;

/// The eBPF object built by build.rs from `gateway-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    "connect4", "connect6", "sendmsg4", "sendmsg6", "bind4", "bind6",
];
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The embedded object or one of its programs was refused by the kernel.
    #[error("loading eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A program's link could not be taken for pinning.
    #[error("eBPF program {program}: {source}")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// The policy does not fit the kernel maps.
    #[error("{0}")]
    Policy(String),
    /// A program loaded without aya (kernel/unix.rs) could not be loaded or attached.
    #[error("{0}")]
    Raw(String),
    /// The embedded object lacks a program or map this gateway expects.
    #[error("the embedded eBPF object has no `{0}`: rebuild the gateway")]
    Missing(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Loads program `$name` of type `$kind`, attaches it as `$attach` says, returns its link.
macro_rules! attach_one {
    ($self:ident, $kind:ty, $name:expr, |$p:ident| $attach:expr) => {{
        let name: &'static str = $name;
        let err = |source| KernelError::Program {
            program: name,
            source,
        };
        let prog: &mut $kind = $self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
            .map_err(err)?;
        prog.load().map_err(err)?;
        let $p = &mut *prog;
        let id = $attach.map_err(err)?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(err)?
            .try_into()
            .map_err(|source| KernelError::Link {
                program: name,
                source,
            })?;
        link
    }};
}

/// Where the sandbox is, and what it may reach directly.
pub struct Target<'a> {
    pub cgroup_dir: &'a Path,
    pub cgroup_id: u64,
    pub tunnel: SocketAddr,
    /// The tunnel's listening socket. The programs let a connection to `tunnel` through only
    /// when this socket is the one that would take it: once the gateway is gone, a process
    /// that binds the freed port gets nothing of the sandbox.
    pub tunnel_listener: BorrowedFd<'a>,
    /// The only user that may connect to the tunnel from this sandbox; `None`, any.
    pub tunnel_uid: Option<u32>,
    pub policy: &'a Policy,
    pub pin_dir: &'a Path,
}

/// Programs attached and pinned for one sandbox. Dropping it leaves the links pinned (fail
/// closed); [`Enforcer::detach`] removes them.
pub struct Enforcer {
    ebpf: Ebpf,
    links: Vec<PinnedLink>,
    pin_dir: PathBuf,
    policy: Option<PolicyMaps>,
}

impl Enforcer {
    pub fn attach(target: &Target<'_>) -> Result<Self, KernelError> {
        let compiled = Compiled::new(target.policy)?;
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        maps::configure(&mut ebpf, target)?;
        let mut enforcer = Self {
            ebpf,
            links: Vec::new(),
            pin_dir: target.pin_dir.to_owned(),
            policy: None,
        };
        std::fs::create_dir_all(target.pin_dir).map_err(|source| KernelError::Io {
            path: target.pin_dir.to_owned(),
            source,
        })?;
        // Before any program is attached: whatever a crash leaves attached, cleanup finds the
        // ring its refusals go to, and writes them to the audit log before unpinning.
        for name in [stale::EVENTS_PIN, stale::LOST_PIN] {
            let path = target.pin_dir.join(name);
            let map = enforcer.ebpf.map(name).ok_or_else(|| missing(name))?;
            map.pin(&path)
                .map_err(|source| KernelError::Pin { path, source })?;
        }
        let cgroup = File::open(target.cgroup_dir).map_err(|source| KernelError::Io {
            path: target.cgroup_dir.to_owned(),
            source,
        })?;
        enforcer.attach_cgroup_programs(&cgroup)?;
        let unix_links = unix::attach(&enforcer.ebpf, &cgroup, target.pin_dir)?;
        enforcer.links.extend(unix_links);
        // The cgroup is still empty: until this fill nothing runs there to find the maps
        // empty, and empty refuses everything anyway.
        let mut policy = PolicyMaps::take(&mut enforcer.ebpf)?;
        policy.replace(&compiled)?;
        policy.clear_retired()?;
        enforcer.policy = Some(policy);
        Ok(enforcer)
    }

    fn attach_cgroup_programs(&mut self, cgroup: &File) -> Result<(), KernelError> {
        for name in SOCK_ADDR_PROGRAMS {
            let link = attach_one!(self, CgroupSockAddr, name, |p| p
                .attach(cgroup, CgroupAttachMode::Single));
            self.pin(name, link)?;
        }
        let link = attach_one!(self, CgroupSock, "sock_create", |p| p
            .attach(cgroup, CgroupAttachMode::Single));
        self.pin("sock_create", link)?;
        for (name, direction) in [
            ("skb_egress", CgroupSkbAttachType::Egress),
            ("skb_ingress", CgroupSkbAttachType::Ingress),
        ] {
            let link = attach_one!(self, CgroupSkb, name, |p| p.attach(
                cgroup,
                direction,
                CgroupAttachMode::Single
            ));
            self.pin(name, link)?;
        }
        self.attach_setsockopt(cgroup)?;
        let link = attach_one!(self, SockOps, "tunnel_clients", |p| p
            .attach(cgroup, CgroupAttachMode::Single));
        self.pin("tunnel_clients", link)?;
        Ok(())
    }

    /// aya 0.14 loads a sockopt program but cannot turn its link into one to pin, so the
    /// link is made and pinned with bpf(2) as for the unix programs.
    fn attach_setsockopt(&mut self, cgroup: &File) -> Result<(), KernelError> {
        const NAME: &str = "setsockopt";
        const BPF_CGROUP_SETSOCKOPT: u32 = 22;
        let err = |source| KernelError::Program {
            program: NAME,
            source,
        };
        let prog: &mut CgroupSockopt = self
            .ebpf
            .program_mut(NAME)
            .ok_or_else(|| missing(NAME))?
            .try_into()
            .map_err(err)?;
        prog.load().map_err(err)?;
        let fd = prog.fd().map_err(err)?.as_fd().as_raw_fd();
        let link = unix::link_create(&fd, cgroup, BPF_CGROUP_SETSOCKOPT)
            .map_err(|e| unix::io_err(NAME, e))?;
        let path = self.pin_dir.join(NAME);
        unix::pin(&link, &path).map_err(|e| unix::io_err(NAME, e))?;
        let pinned = PinnedLink::from_pin(&path).map_err(|source| KernelError::Link {
            program: NAME,
            source,
        })?;
        self.links.push(pinned);
        Ok(())
    }

    fn pin(&mut self, name: &str, link: FdLink) -> Result<(), KernelError> {
        let path = self.pin_dir.join(name);
        let pinned = link
            .pin(&path)
            .map_err(|source| KernelError::Pin { path, source })?;
        self.links.push(pinned);
        Ok(())
    }

    /// The reader of refusal events; call once.
    pub fn events(&mut self) -> Result<EventReader, KernelError> {
        let ring = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| missing("EVENTS"))?;
        let ring = RingBuf::try_from(ring).map_err(|source| KernelError::Map {
            map: "EVENTS",
            source,
        })?;
        let lost = self.ebpf.take_map("LOST").ok_or_else(|| missing("LOST"))?;
        let lost: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(lost).map_err(|source| KernelError::Map {
                map: "LOST",
                source,
            })?;
        Ok(EventReader::new(ring, lost))
    }

    /// The policy maps, for reloads; `None` after the first call.
    pub fn policy_maps(&mut self) -> Option<PolicyMaps> {
        self.policy.take()
    }

    /// Which sandbox made each client connection of the tunnel; call once.
    pub fn tunnel_clients(&mut self) -> Result<TunnelClients, KernelError> {
        let map = self
            .ebpf
            .take_map("TUNNEL_CLIENTS")
            .ok_or_else(|| missing("TUNNEL_CLIENTS"))?;
        let map = HashMap::try_from(map).map_err(|source| KernelError::Map {
            map: "TUNNEL_CLIENTS",
            source,
        })?;
        Ok(TunnelClients::new(map))
    }

    /// Where its links and event maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Unpins and detaches every program; the sandbox must be dead by now.
    pub fn detach(self) -> Result<(), KernelError> {
        for link in self.links {
            link.unpin().map_err(|source| KernelError::Io {
                path: self.pin_dir.clone(),
                source,
            })?;
        }
        remove_pin_dir(&self.pin_dir)
    }
}

/// Whether a pin directory holds any link (anything but the event maps).
pub fn has_links(dir: &Path) -> Result<bool, KernelError> {
    Ok(!links_in(dir)?.is_empty())
}

/// Unpins the links a crashed run left in its pin directory, which detaches its programs;
/// its event maps stay pinned, for the last of their events to be read.
pub fn unpin_links(dir: &Path) -> Result<(), KernelError> {
    for link in links_in(dir)? {
        std::fs::remove_file(&link).map_err(|source| KernelError::Io { path: link, source })?;
    }
    Ok(())
}

fn links_in(dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    let io = |source| KernelError::Io {
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut links = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if name != stale::EVENTS_PIN && name != stale::LOST_PIN {
            links.push(entry.path());
        }
    }
    Ok(links)
}

/// Removes a pin directory and whatever links (and event maps) a crashed run left in it.
pub fn remove_pin_dir(dir: &Path) -> Result<(), KernelError> {
    let io = |source| KernelError::Io {
        path: dir.to_owned(),
        source,
    };
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                std::fs::remove_file(entry.map_err(io)?.path()).map_err(io)?;
            }
            std::fs::remove_dir(dir).map_err(io)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

fn missing(name: &str) -> KernelError {
    KernelError::Missing(name.to_owned())
}
