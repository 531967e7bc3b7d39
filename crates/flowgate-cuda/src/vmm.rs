//! A virtual-memory arena for paging (experts): one large virtual address range is reserved
//! once with `cuMemAddressReserve` and cut into fixed-size slots. Mapping a slot creates a
//! physical chunk (`cuMemCreate`, a whole number of allocation-granularity units: 2 MiB on
//! H100), maps it at the slot's address (`cuMemMap`) and grants read/write access
//! (`cuMemSetAccess`); unmapping releases the physical memory. A slot's address is fixed for the
//! arena's life, so pointers handed to kernels stay valid while the slot is resident, and
//! physical memory is charged to the allocator's [`MemoryBudget`] only while mapped.

use std::sync::Arc;

use cudarc::driver::sys;

use crate::device::Device;
use crate::error::{check, CudaError};
use crate::memory::{copy_dtoh_async, copy_htod_async, range_check, DeviceAllocator, MemoryBudget};
use crate::stream::Stream;

/// Granularities reported by the driver for pinned device allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmInfo {
    /// Minimum granularity (sizes and addresses must be multiples).
    pub minimum: usize,
    /// Recommended granularity for performance.
    pub recommended: usize,
}

fn device_prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is a plain C struct; all-zero is its documented default.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    prop
}

/// Round `n` up to a multiple of `g` (g > 0), None on overflow.
pub(crate) fn round_up(n: usize, g: usize) -> Option<usize> {
    n.checked_add(g - 1).map(|v| v / g * g)
}

/// A reserved VA range of `slots` fixed slots.
#[derive(Debug)]
pub struct VmmArena {
    device: Device,
    budget: Arc<MemoryBudget>,
    base: sys::CUdeviceptr,
    slot_bytes: usize,
    granularity: usize,
    handles: Vec<Option<sys::CUmemGenericAllocationHandle>>,
}

impl VmmArena {
    /// The driver's allocation granularities on `device`.
    pub fn info(device: &Device) -> Result<VmmInfo, CudaError> {
        device.bind()?;
        let prop = device_prop(device.ordinal() as i32);
        let (mut minimum, mut recommended) = (0usize, 0usize);
        // SAFETY: valid out-pointers and a fully initialised prop.
        unsafe {
            check(
                "cuMemGetAllocationGranularity",
                sys::cuMemGetAllocationGranularity(
                    &mut minimum,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                ),
            )?;
            check(
                "cuMemGetAllocationGranularity",
                sys::cuMemGetAllocationGranularity(
                    &mut recommended,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                ),
            )?;
        }
        if minimum == 0 {
            return Err(CudaError::InvalidArgument(
                "driver reported zero granularity".into(),
            ));
        }
        Ok(VmmInfo {
            minimum,
            recommended: recommended.max(minimum),
        })
    }

    /// Reserve `slots` slots of at least `slot_bytes` each (rounded up to the granularity).
    /// Reserving address space costs no physical memory and nothing against the budget.
    pub fn new(
        alloc: &DeviceAllocator,
        slot_bytes: usize,
        slots: usize,
    ) -> Result<VmmArena, CudaError> {
        if slot_bytes == 0 || slots == 0 {
            return Err(CudaError::InvalidArgument("empty VMM arena".into()));
        }
        let device = alloc.device().clone();
        let granularity = Self::info(&device)?.minimum;
        let slot_bytes = round_up(slot_bytes, granularity)
            .ok_or_else(|| CudaError::InvalidArgument("slot size overflows".into()))?;
        let total = slot_bytes
            .checked_mul(slots)
            .ok_or_else(|| CudaError::InvalidArgument("arena size overflows".into()))?;
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; context current (bound in info()).
        check("cuMemAddressReserve", unsafe {
            sys::cuMemAddressReserve(&mut base, total, granularity, 0, 0)
        })?;
        Ok(VmmArena {
            device,
            budget: alloc.budget().clone(),
            base,
            slot_bytes,
            granularity,
            handles: vec![None; slots],
        })
    }

    /// Bytes per slot (a multiple of the granularity).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.handles.len()
    }

    /// The allocation granularity used.
    pub fn granularity(&self) -> usize {
        self.granularity
    }

    /// Base of the reserved range.
    pub fn base(&self) -> sys::CUdeviceptr {
        self.base
    }

    /// The fixed address of `slot` (mapped or not).
    pub fn slot_ptr(&self, slot: usize) -> Result<sys::CUdeviceptr, CudaError> {
        if slot >= self.handles.len() {
            return Err(CudaError::InvalidArgument(format!(
                "slot {slot} of {}",
                self.handles.len()
            )));
        }
        Ok(self.base + (slot * self.slot_bytes) as u64)
    }

    /// Is `slot` backed by physical memory?
    pub fn is_mapped(&self, slot: usize) -> bool {
        matches!(self.handles.get(slot), Some(Some(_)))
    }

    /// Number of mapped slots.
    pub fn mapped(&self) -> usize {
        self.handles.iter().filter(|h| h.is_some()).count()
    }

    /// Back `slot` with physical memory (charged to the budget) and return its address.
    /// Mapping an already mapped slot returns its address and charges nothing.
    pub fn map(&mut self, slot: usize) -> Result<sys::CUdeviceptr, CudaError> {
        let addr = self.slot_ptr(slot)?;
        if self.is_mapped(slot) {
            return Ok(addr);
        }
        let size = self.slot_bytes;
        self.budget.try_reserve(size as u64)?;
        match self.map_physical(addr, size) {
            Ok(h) => {
                self.handles[slot] = Some(h);
                Ok(addr)
            }
            Err(e) => {
                self.budget.release(size as u64);
                Err(e)
            }
        }
    }

    fn map_physical(
        &self,
        addr: sys::CUdeviceptr,
        size: usize,
    ) -> Result<sys::CUmemGenericAllocationHandle, CudaError> {
        self.device.bind()?;
        let prop = device_prop(self.device.ordinal() as i32);
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: size is a multiple of the granularity; prop is initialised.
        check("cuMemCreate", unsafe {
            sys::cuMemCreate(&mut h, size, &prop, 0)
        })?;
        // SAFETY: addr..addr+size lies inside our reservation and is not mapped (handles[slot] is None).
        if let Err(e) = check("cuMemMap", unsafe { sys::cuMemMap(addr, size, 0, h, 0) }) {
            // SAFETY: h was created above and is not mapped.
            let _ = unsafe { sys::cuMemRelease(h) };
            return Err(e);
        }
        let desc = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was just mapped; desc is one valid descriptor.
        if let Err(e) = check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(addr, size, &desc, 1)
        }) {
            // SAFETY: undo the mapping and the handle made above.
            unsafe {
                let _ = sys::cuMemUnmap(addr, size);
                let _ = sys::cuMemRelease(h);
            }
            return Err(e);
        }
        Ok(h)
    }

    /// Release `slot`'s physical memory (and its budget charge). Synchronises the device first so
    /// that no queued work still reads the slot. Unmapping an unmapped slot does nothing.
    pub fn unmap(&mut self, slot: usize) -> Result<(), CudaError> {
        let addr = self.slot_ptr(slot)?;
        let Some(h) = self.handles[slot] else {
            return Ok(());
        };
        self.device.synchronize()?;
        self.device.bind()?;
        // SAFETY: addr..+slot_bytes is mapped to h (handles[slot]); no work is in flight.
        check("cuMemUnmap", unsafe {
            sys::cuMemUnmap(addr, self.slot_bytes)
        })?;
        self.handles[slot] = None;
        self.budget.release(self.slot_bytes as u64);
        // SAFETY: h is no longer mapped anywhere.
        check("cuMemRelease", unsafe { sys::cuMemRelease(h) })
    }

    /// Copy `src` into mapped `slot` at `offset` and wait.
    pub fn write(
        &self,
        stream: &Stream,
        slot: usize,
        offset: usize,
        src: &[u8],
    ) -> Result<(), CudaError> {
        let addr = self.mapped_ptr(slot)?;
        range_check(offset, src.len(), self.slot_bytes)?;
        self.device.bind()?;
        // SAFETY: range inside a mapped slot; src outlives the synchronize.
        unsafe { copy_htod_async(stream, addr + offset as u64, src) }?;
        stream.synchronize()
    }

    /// Copy from mapped `slot` at `offset` into `dst` and wait.
    pub fn read(
        &self,
        stream: &Stream,
        slot: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), CudaError> {
        let addr = self.mapped_ptr(slot)?;
        range_check(offset, dst.len(), self.slot_bytes)?;
        self.device.bind()?;
        // SAFETY: range inside a mapped slot; dst outlives the synchronize.
        unsafe { copy_dtoh_async(stream, dst, addr + offset as u64) }?;
        stream.synchronize()
    }

    fn mapped_ptr(&self, slot: usize) -> Result<sys::CUdeviceptr, CudaError> {
        let addr = self.slot_ptr(slot)?;
        if !self.is_mapped(slot) {
            return Err(CudaError::InvalidArgument(format!(
                "slot {slot} is not mapped"
            )));
        }
        Ok(addr)
    }
}

impl Drop for VmmArena {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        if self.device.bind().is_err() {
            return;
        }
        for slot in 0..self.handles.len() {
            if let Some(h) = self.handles[slot].take() {
                let addr = self.base + (slot * self.slot_bytes) as u64;
                // SAFETY: slot mapped to h; device synchronised above.
                unsafe {
                    let _ = sys::cuMemUnmap(addr, self.slot_bytes);
                    let _ = sys::cuMemRelease(h);
                }
                self.budget.release(self.slot_bytes as u64);
            }
        }
        // SAFETY: the whole reservation, now with nothing mapped, freed once.
        let _ = unsafe { sys::cuMemAddressFree(self.base, self.slot_bytes * self.handles.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::round_up;

    #[test]
    fn rounding() {
        let g = 2 << 20;
        assert_eq!(round_up(1, g), Some(g));
        assert_eq!(round_up(g, g), Some(g));
        assert_eq!(round_up(g + 1, g), Some(2 * g));
        assert_eq!(round_up(usize::MAX, g), None);
    }
}
