namespace ActorVmm.LibVmm;

/// <summary>
/// KVM's dirty bitmap of memslots with manual protection (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG):
/// what the vmspace needs of a VM for <c>dirty-tracking = dirty-log</c>. <see cref="VmHandle"/> is it.
/// </summary>
public interface IDirtyLog
{
    /// <summary>One bit per page of the slot, set for pages written since they were last cleared.</summary>
    ulong[] GetDirtyLog(uint slot, ulong pages);

    /// <summary>Clears (and write-protects again) the pages set in <paramref name="bitmap"/>, bit i = page
    /// <paramref name="firstPage"/> + i; <paramref name="firstPage"/> is a multiple of 64.</summary>
    void ClearDirtyLog(uint slot, ulong firstPage, uint pages, ulong[] bitmap);
}

/// <summary>A KVM memslot as this VM registered it.</summary>
public readonly record struct MemorySlot(uint Slot, GuestPhysAddr Base, ulong Size, bool ReadOnly, bool LogDirty)
{
    public bool Contains(GuestPhysAddr a) => a.Value >= Base.Value && a.Value - Base.Value < Size;
}

/// <summary>One KVM VM: memslots, vcpus and VM-wide settings.</summary>
public sealed unsafe partial class VmHandle : IDirtyLog, IDisposable
{
    /// <summary>Where KVM's real-mode TSS (3 pages) and identity map page live: just below the
    /// firmware's 4 GiB alias, inside the MMIO hole, never RAM.</summary>
    public const ulong TssAddress = 0xFFFB_D000;
    public const ulong IdentityMapAddress = 0xFFFB_C000;

    private readonly Kvm _kvm;
    private int _fd;
    // Copy-on-write: vcpu threads read it while harvesting their dirty rings.
    private volatile MemorySlot[] _slots = [];
    private int _vcpusCreated;

    public int Fd => _fd;
    public Kvm System => _kvm;

    internal VmHandle(Kvm kvm, int fd)
    {
        _kvm = kvm;
        _fd = fd;
        if (Native.Ioctl(fd, KvmIoctl.SetTssAddr, unchecked((nint)TssAddress)) < 0) throw KvmException.Last("KVM_SET_TSS_ADDR");
        var map = IdentityMapAddress;
        if (_kvm.CheckExtension(KvmCap.SetIdentityMapAddr) > 0 &&
            // SAFETY: map is a local 64-bit address, alive for the call; KVM reads those 8 bytes.
            Native.Ioctl(fd, KvmIoctl.SetIdentityMapAddr, &map) < 0)
            throw KvmException.Last("KVM_SET_IDENTITY_MAP_ADDR");
    }

    /// <summary>KVM_SET_USER_MEMORY_REGION. A size of 0 deletes the slot.</summary>
    /// <param name="logDirty">KVM logs the guest's writes to the slot (read with <see cref="GetDirtyLog"/>)</param>
    /// <param name="slot">the memslot number</param>
    /// <param name="guestAddress">where the slot starts in the guest's physical address space</param>
    /// <param name="size">its length in bytes (a multiple of 4 KiB); 0 deletes the slot</param>
    /// <param name="hostAddress">the host mapping that backs it</param>
    /// <param name="readOnly">guest writes exit as MMIO instead of writing</param>
    public void SetUserMemoryRegion(uint slot, GuestPhysAddr guestAddress, ulong size, nint hostAddress, bool readOnly = false,
        bool logDirty = false)
    {
        var region = new KvmUserspaceMemoryRegion
        {
            Slot = slot,
            Flags = (readOnly ? KvmUserspaceMemoryRegion.ReadOnly : 0) | (logDirty ? KvmUserspaceMemoryRegion.LogDirtyPages : 0),
            GuestPhysAddr = guestAddress.Value,
            MemorySize = size,
            UserspaceAddr = (ulong)hostAddress,
        };
        // SAFETY: region is a local with the layout of the kernel's struct kvm_userspace_memory_region,
        // alive for the whole call; the ioctl reads and writes only that struct. The host range it
        // names is the caller's to keep mapped while the slot exists.
        if (Native.Ioctl(_fd, KvmIoctl.SetUserMemoryRegion, &region) < 0)
            throw KvmException.Last($"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {guestAddress}, size 0x{size:X})");
        var slots = _slots.Where(s => s.Slot != slot);
        _slots = [.. size == 0 ? slots : slots.Append(new MemorySlot(slot, guestAddress, size, readOnly, logDirty))];
    }

    /// <summary>The memslots registered so far (any thread).</summary>
    public IReadOnlyList<MemorySlot> Slots => _slots;

    /// <summary>The guest frame number of page <paramref name="offset"/> of memslot <paramref name="slot"/>
    /// (as a dirty-ring entry names it); false for a slot this VM does not have (or another address space).</summary>
    public bool TryGfn(uint slot, ulong offset, out ulong gfn)
    {
        foreach (var s in _slots)
            if (s.Slot == slot && offset < s.Size / 4096)
            {
                gfn = (s.Base.Value >> 12) + offset;
                return true;
            }
        gfn = 0;
        return false;
    }

    /// <summary>KVM_ENABLE_CAP on the VM.</summary>
    public void EnableCap(KvmCap cap, ulong arg0 = 0)
    {
        var c = new KvmEnableCap { Cap = (uint)cap };
        c.Args[0] = arg0;
        // SAFETY: c is a local with the layout of the kernel's struct kvm_enable_cap, alive for the
        // whole call; the ioctl reads and writes only that struct.
        if (Native.Ioctl(_fd, KvmIoctl.EnableCap, &c) < 0) throw KvmException.Last($"KVM_ENABLE_CAP({cap})");
    }

    /// <summary>Whether <see cref="EnableManualDirtyLogProtect"/> was done: <see cref="GetDirtyLog"/>
    /// then leaves pages writable until <see cref="ClearDirtyLog"/>.</summary>
    public bool ManualDirtyLogProtect { get; private set; }

    /// <summary>
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: reading the dirty log no longer write-protects the pages it
    /// reports; <see cref="ClearDirtyLog"/> does, for the pages it is given (a harvest can re-arm part
    /// of a slot). Must come before any slot logs dirty pages. Without INITIALLY_SET a fresh slot
    /// starts clean and write-protected, as with the classic log.
    /// </summary>
    public void EnableManualDirtyLogProtect()
    {
        const ulong manualProtectEnable = 1;
        EnableCap(KvmCap.ManualDirtyLogProtect2, manualProtectEnable);
        ManualDirtyLogProtect = true;
    }

    /// <summary>
    /// KVM_GET_DIRTY_LOG: one bit per 4 KiB page of the slot, set for pages the guest wrote since the
    /// last harvest (bit i of word i/64 is page i). Without manual protection this also re-arms the
    /// whole slot; with it, see <see cref="ClearDirtyLog"/>.
    /// </summary>
    public ulong[] GetDirtyLog(uint slot, ulong pages)
    {
        var bitmap = new ulong[(pages + 63) / 64];
        // SAFETY: bitmap is pinned for the block and has one bit for each of the slot's pages, as many
        // as KVM writes; log is a local struct kvm_dirty_log.
        fixed (ulong* p = bitmap)
        {
            var log = new KvmDirtyLog { Slot = slot, DirtyBitmap = (ulong)p };
            if (Native.Ioctl(_fd, KvmIoctl.GetDirtyLog, &log) < 0) throw KvmException.Last($"KVM_GET_DIRTY_LOG(slot {slot})");
        }
        return bitmap;
    }

    /// <summary>
    /// KVM_CLEAR_DIRTY_LOG: write-protects again the pages set in <paramref name="bitmap"/> (bit i =
    /// page <paramref name="firstPage"/> + i) and clears them in the log. <paramref name="firstPage"/>
    /// is a multiple of 64, and <paramref name="pages"/> too unless the range ends the slot.
    /// </summary>
    public void ClearDirtyLog(uint slot, ulong firstPage, uint pages, ulong[] bitmap)
    {
        if ((ulong)bitmap.Length * 64 < pages) throw new ArgumentException($"a bitmap of {bitmap.Length} words is short of {pages} pages", nameof(bitmap));
        // SAFETY: bitmap is pinned for the block and covers pages bits (checked above), all KVM reads;
        // clear is a local struct kvm_clear_dirty_log.
        fixed (ulong* p = bitmap)
        {
            var clear = new KvmClearDirtyLog { Slot = slot, FirstPage = firstPage, NumPages = pages, DirtyBitmap = (ulong)p };
            if (Native.Ioctl(_fd, KvmIoctl.ClearDirtyLog, &clear) < 0)
                throw KvmException.Last($"KVM_CLEAR_DIRTY_LOG(slot {slot}, pages {firstPage}+{pages})");
        }
    }

    /// <summary>The page numbers (relative to the slot) set in a dirty bitmap, ascending.</summary>
    public static IEnumerable<ulong> DirtyPages(ulong[] bitmap)
    {
        for (var w = 0; w < bitmap.Length; w++)
        {
            var word = bitmap[w];
            while (word != 0)
            {
                var bit = global::System.Numerics.BitOperations.TrailingZeroCount(word);
                yield return (ulong)w * 64 + (ulong)bit;
                word &= word - 1;
            }
        }
    }

    /// <summary>Bytes of each vcpu's dirty ring (0: no dirty ring). See <see cref="EnableDirtyRing"/>.</summary>
    public uint DirtyRingBytes { get; private set; }

    /// <summary>
    /// KVM_CAP_DIRTY_LOG_RING_ACQ_REL (or, if this KVM only offers it, KVM_CAP_DIRTY_LOG_RING): every
    /// vcpu created from now on gets a dirty ring of <paramref name="entries"/> entries (a power of
    /// two, at least <see cref="DirtyRing.MinEntries"/>), mapped by <see cref="CreateVcpu"/>. Writes
    /// to slots registered with logDirty are then reported in the writing vcpu's ring, not in the
    /// dirty bitmap (KVM_GET_DIRTY_LOG fails). Must come before the first vcpu.
    /// </summary>
    /// <exception cref="KvmException">with a message a user can act on</exception>
    public void EnableDirtyRing(uint entries)
    {
        if (_vcpusCreated > 0) throw new KvmException("the dirty ring must be enabled before the first vcpu is created");
        if (entries < DirtyRing.MinEntries || (entries & (entries - 1)) != 0)
            throw new KvmException($"a dirty ring of {entries} entries: the size must be a power of two of at least {DirtyRing.MinEntries} entries");
        var acqRel = _kvm.CheckExtension(KvmCap.DirtyLogRingAcqRel);
        var plain = _kvm.CheckExtension(KvmCap.DirtyLogRing);
        var maxBytes = (ulong)Math.Max(acqRel, plain);
        if (maxBytes == 0) throw new KvmException("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)");
        var bytes = (ulong)entries * (ulong)sizeof(KvmDirtyGfn);
        if (bytes > maxBytes)
            throw new KvmException($"a dirty ring of {entries} entries is larger than this KVM allows ({maxBytes / (ulong)sizeof(KvmDirtyGfn)} entries)");
        try
        {
            EnableCap(acqRel > 0 ? KvmCap.DirtyLogRingAcqRel : KvmCap.DirtyLogRing, bytes);
        }
        catch (KvmException e)
        {
            throw new KvmException($"{e.Message} (KVM keeps some entries of each ring in reserve: try a larger power of two than {entries})");
        }
        DirtyRingBytes = (uint)bytes;
    }

    /// <summary>
    /// KVM_RESET_DIRTY_RINGS: the entries every vcpu harvested (marked RESET) are given back to KVM
    /// and their pages write-protected again, so the next write to each is reported anew. Any thread.
    /// Returns how many entries were reset.
    /// </summary>
    public int ResetDirtyRings()
    {
        var n = Native.Ioctl(_fd, KvmIoctl.ResetDirtyRings, 0);
        if (n < 0) throw KvmException.Last("KVM_RESET_DIRTY_RINGS");
        return n;
    }

    /// <summary>
    /// KVM_CAP_SPLIT_IRQCHIP: the local APICs move into the kernel (registers, timer, IPIs, INIT/SIPI,
    /// HLT); the IOAPIC and the 8259s stay in user space. <paramref name="ioapicPins"/> GSI routes are
    /// reserved for the user-space IOAPIC: an EOI of a vector that a level-triggered one of them names
    /// exits with KVM_EXIT_IOAPIC_EOI. Must come before the first vcpu is created.
    /// </summary>
    public void EnableSplitIrqchip(uint ioapicPins = 24)
    {
        if (_kvm.CheckExtension(KvmCap.SplitIrqchip) <= 0)
            throw new KvmException("KVM_CAP_SPLIT_IRQCHIP is not supported by this KVM (an in-kernel local APIC needs it)");
        EnableCap(KvmCap.SplitIrqchip, ioapicPins);
        SplitIrqchip = true;
    }

    /// <summary>Whether <see cref="EnableSplitIrqchip"/> was done.</summary>
    public bool SplitIrqchip { get; private set; }

    [global::System.Runtime.InteropServices.StructLayout(global::System.Runtime.InteropServices.LayoutKind.Sequential)]
    private struct KvmMsi
    {
        public uint AddressLo, AddressHi, Data, Flags, DevId;
        public fixed byte Pad[12];
    }

    /// <summary>
    /// KVM_SIGNAL_MSI: an interrupt message to the in-kernel local APICs (address 0xFEExxxxx with
    /// destination and mode, data with vector, delivery and trigger mode). Any thread. True when at
    /// least one APIC took it; false when none did (no destination matched, or the APIC is disabled).
    /// </summary>
    public bool SignalMsi(ulong address, uint data)
    {
        var msi = new KvmMsi { AddressLo = (uint)address, AddressHi = (uint)(address >> 32), Data = data };
        // SAFETY: msi is a local with the layout of the kernel's struct kvm_msi, alive for the whole
        // call; the ioctl reads and writes only that struct.
        var n = Native.Ioctl(_fd, KvmIoctl.SignalMsi, &msi);
        if (n < 0) throw KvmException.Last($"KVM_SIGNAL_MSI(address 0x{address:X}, data 0x{data:X})");
        return n > 0;
    }

    /// <summary>One MSI route of the GSI routing table (KVM_IRQ_ROUTING_MSI).</summary>
    public readonly record struct MsiRoute(uint Gsi, ulong Address, uint Data);

    [global::System.Runtime.InteropServices.StructLayout(global::System.Runtime.InteropServices.LayoutKind.Sequential)]
    private struct KvmIrqRoutingEntry
    {
        public uint Gsi, Type, Flags, Pad;
        public uint AddressLo, AddressHi, Data, DevId;
        public fixed uint Rest[4];
    }

    /// <summary>KVM_SET_GSI_ROUTING with MSI routes only (a split irqchip allows no other kind
    /// below its IOAPIC pins). Replaces the whole table.</summary>
    public void SetMsiRoutes(IReadOnlyList<MsiRoute> routes)
    {
        const uint routingMsi = 2;
        var size = 8 + sizeof(KvmIrqRoutingEntry) * routes.Count;
        var buffer = new byte[size];
        // SAFETY: buffer is pinned for the block and holds struct kvm_irq_routing: nr in its first 4
        // bytes (and 4 of flags), then routes.Count kvm_irq_routing_entry records; KVM reads no more
        // than nr.
        fixed (byte* p = buffer)
        {
            *(uint*)p = (uint)routes.Count;
            var entries = (KvmIrqRoutingEntry*)(p + 8);
            for (var i = 0; i < routes.Count; i++)
                entries[i] = new KvmIrqRoutingEntry
                {
                    Gsi = routes[i].Gsi, Type = routingMsi,
                    AddressLo = (uint)routes[i].Address, AddressHi = (uint)(routes[i].Address >> 32), Data = routes[i].Data,
                };
            if (Native.Ioctl(_fd, KvmIoctl.SetGsiRouting, p) < 0) throw KvmException.Last($"KVM_SET_GSI_ROUTING({routes.Count} routes)");
        }
    }

    /// <summary>KVM_CREATE_VCPU, maps its kvm_run page and applies the CPUID policy.</summary>
    public VcpuHandle CreateVcpu(int id, CpuidPolicy cpuid)
    {
        var fd = Native.Ioctl(_fd, KvmIoctl.CreateVcpu, id);
        if (fd < 0) throw KvmException.Last($"KVM_CREATE_VCPU({id})");
        _vcpusCreated++;
        var vcpu = new VcpuHandle(id, fd, _kvm.VcpuMmapSize, this);
        try
        {
            if (DirtyRingBytes > 0) vcpu.MapDirtyRing(DirtyRingBytes);
            vcpu.SetCpuid(cpuid.EntriesFor(id));
        }
        catch
        {
            vcpu.Dispose();
            throw;
        }
        return vcpu;
    }

    public void Dispose()
    {
        if (_fd > 0) Native.Close(_fd);
        _fd = -1;
    }
}
