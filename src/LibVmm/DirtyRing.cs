namespace ActorVmm.LibVmm;

/// <summary>
/// One vcpu's KVM dirty ring (KVM_CAP_DIRTY_LOG_RING, Documentation/virt/kvm/api.rst §8.29): an
/// array of <see cref="KvmDirtyGfn"/> that KVM shares with user space at page
/// <see cref="PageOffset"/> of the vcpu fd. When the vcpu writes a logged page that is
/// write-protected, KVM pushes an entry (DIRTY, slot, page in slot) at its own index and lets the
/// write through. User space harvests entries strictly in order from its own index, marking each
/// DIRTY → RESET, and then calls KVM_RESET_DIRTY_RINGS (<see cref="VmHandle.ResetDirtyRings"/>),
/// which write-protects the harvested pages again and hands the entries back to KVM.
/// <para>Ordering: the flags are read with acquire semantics before the slot and offset, and
/// written (RESET) with release semantics after them — what KVM_CAP_DIRTY_LOG_RING_ACQ_REL asks of
/// user space (on x86, whose stores are TSO, the plain capability needs no more).</para>
/// <para>Only the vcpu's own thread harvests: the fetch index is not shared.</para>
/// <para>A full ring: KVM asks the vcpu to exit (KVM_EXIT_DIRTY_RING_FULL) once the ring is full
/// but for a reserve of entries, at its next entry into the guest. A vcpu that dirties more pages
/// than the reserve without re-entering fills the ring, and KVM loses what it pushes after that
/// (measured on kvm_pvm, whose instruction emulator runs a guest loop without re-entering:
/// WARN in kvm_dirty_ring_push, the pages written after never reported). A harvest that finds
/// every entry dirty says so (<see cref="DirtyRingHarvest.RingWasFull"/>): its caller must treat
/// every page as possibly dirty.</para>
/// </summary>
public sealed unsafe class DirtyRing : IDisposable
{
    /// <summary>KVM_DIRTY_LOG_PAGE_OFFSET on x86 (asm/kvm.h): the ring starts this many pages into the vcpu fd.</summary>
    public const long PageOffset = 64;

    /// <summary>The smallest ring KVM takes is one page (it also keeps some entries in reserve).</summary>
    public const uint MinEntries = 4096 / 16;

    private readonly uint _mask;
    private KvmDirtyGfn* _entries;
    private readonly nuint _bytes;
    private uint _next; // free-running: the next entry to harvest is _next & _mask

    public uint Entries { get; }

    internal DirtyRing(int vcpuFd, int vcpuId, uint bytes)
    {
        Entries = bytes / (uint)sizeof(KvmDirtyGfn);
        _mask = Entries - 1;
        _bytes = bytes;
        var p = Native.Mmap(0, _bytes, Native.PROT_READ | Native.PROT_WRITE, Native.MAP_SHARED, vcpuFd, PageOffset * 4096);
        if (p == Native.MAP_FAILED) throw KvmException.Last($"mmap(dirty ring of vcpu {vcpuId}, {bytes} bytes)");
        // SAFETY: p maps Entries whole kvm_dirty_gfn records (bytes is a multiple of their size, as
        // KVM_CAP_DIRTY_LOG_RING requires); the mapping lives until Dispose.
        _entries = (KvmDirtyGfn*)p;
    }

    /// <summary>
    /// Harvests every entry KVM has pushed since the last call, in ring order: adds (slot, page in
    /// slot) to <paramref name="into"/> and marks the entry RESET. Returns how many. The pages stay
    /// writable (and unreported if written again) until <see cref="VmHandle.ResetDirtyRings"/>.
    /// </summary>
    public int Harvest(List<(uint Slot, ulong Offset)> into)
    {
        if (_entries is null) throw new ObjectDisposedException(nameof(DirtyRing));
        var n = 0;
        // At most one lap: an entry this call marked RESET has DIRTY clear, so the loop stops there anyway.
        for (; n < Entries; n++)
        {
            // SAFETY: the index is masked into the ring, which stays mapped until Dispose (same thread).
            var entry = _entries + (_next & _mask);
            var flags = Volatile.Read(ref entry->Flags); // acquire: slot and offset are read after it
            if ((flags & KvmDirtyGfn.FlagDirty) == 0) break;
            into.Add((entry->Slot, entry->Offset));
            Volatile.Write(ref entry->Flags, KvmDirtyGfn.FlagReset); // release: after the reads above
            _next++;
        }
        return n;
    }

    public void Dispose()
    {
        if (_entries is null) return;
        Native.Munmap((nint)_entries, _bytes);
        _entries = null;
    }
}

/// <summary>
/// What one harvest of a vcpu's dirty ring found: guest frame numbers in ring order, and whether
/// every entry of the ring was dirty — then KVM may have lost writes pushed after it filled, and
/// the pages the vcpu wrote are not all in <see cref="Gfns"/>.
/// </summary>
public readonly record struct DirtyRingHarvest(ulong[] Gfns, bool RingWasFull)
{
    public static readonly DirtyRingHarvest Empty = new([], false);
}
