//! The refusals a run's programs made after its gateway died: read from the event maps the
//! run pinned beside its links, so that removing its pins loses none of them.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};

use super::{KernelError, events};
use crate::audit::{AuditError, AuditLog};

/// The pin names of the event ring and the lost-event counter in a run's pin directory:
/// the maps' own names, upper case as no program's link is named.
pub const EVENTS_PIN: &str = "EVENTS";
pub const LOST_PIN: &str = "LOST";

/// The event maps of a run whose gateway is gone.
pub struct PinnedEvents {
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl PinnedEvents {
    /// The maps pinned in `pin_dir`; `None` when there are none (a run that died before
    /// pinning them, or one from a gateway that did not pin them).
    pub fn open(pin_dir: &Path) -> Result<Option<Self>, KernelError> {
        let ring_path = pin_dir.join(EVENTS_PIN);
        if !ring_path.exists() {
            return Ok(None);
        }
        let map_err = |map: &'static str| move |source| KernelError::Map { map, source };
        let ring = MapData::from_pin(&ring_path)
            .and_then(Map::from_map_data)
            .map_err(map_err("EVENTS"))?;
        let ring = RingBuf::try_from(ring).map_err(map_err("EVENTS"))?;
        let lost = MapData::from_pin(pin_dir.join(LOST_PIN))
            .and_then(Map::from_map_data)
            .map_err(map_err("LOST"))?;
        let lost = PerCpuArray::try_from(lost).map_err(map_err("LOST"))?;
        Ok(Some(Self { ring, lost }))
    }

    /// What the lost-event counter holds, summed over the CPUs.
    pub fn lost_total(&self) -> Result<u64, KernelError> {
        let per_cpu = self.lost.get(&0, 0).map_err(|source| KernelError::Map {
            map: "LOST",
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Appends a kernel record per unread event, the record the live reader writes, and
    /// returns how many. Each event leaves the ring as it is queued: the caller syncs the
    /// log before it counts them as saved.
    pub fn save_events(&mut self, audit: &AuditLog, sandbox: &str) -> Result<u64, AuditError> {
        let mut saved = 0;
        while let Some(item) = self.ring.next() {
            let ev = events::event(&item);
            drop(item);
            if let Some(ev) = ev {
                audit.append(&events::describe(&ev, sandbox))?;
                saved += 1;
            }
        }
        Ok(saved)
    }
}
