using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>One KVM vcpu: its fd, its kvm_run page, register access and the run/kick pair.</summary>
public sealed unsafe partial class VcpuHandle : IVcpu
{
    private int _fd;
    private readonly nint _run;
    private readonly int _runSize;
    private volatile int _tid;
    /// <summary>1 from <see cref="PrepareToRun"/> (or the start of a run) until KVM_RUN returns: only
    /// then does <see cref="Kick"/> signal the thread (KVM's own IN_GUEST_MODE, for user space).</summary>
    private int _inRun;
    private readonly VmHandle? _vm;
    private DirtyRing? _dirtyRing;
    private readonly List<(uint Slot, ulong Offset)> _harvest = [];

    public int Id { get; }
    public int Fd => _fd;
    // SAFETY: _run maps the vcpu's kvm_run area (_runSize bytes) from construction until Dispose; a view is
    // used only while its handle lives (KvmRunView's contract).
    public KvmRunView RunPage => new((byte*)_run);

    internal VcpuHandle(int id, int fd, int runSize, VmHandle? vm = null)
    {
        Id = id;
        _vm = vm;
        _fd = fd;
        _runSize = runSize;
        _run = Native.Mmap(0, (nuint)runSize, Native.PROT_READ | Native.PROT_WRITE, Native.MAP_SHARED, fd, 0);
        if (_run == Native.MAP_FAILED)
        {
            var e = KvmException.Last($"mmap(kvm_run of vcpu {id})");
            Native.Close(fd);
            _fd = -1;
            throw e;
        }
        KickSignal.EnsureInstalled();
    }

    /// <summary>KVM_RUN then decode. EINTR (a kick) becomes <see cref="VmExit.Intr"/> and clears
    /// immediate_exit, so the next call enters the guest.</summary>
    public VmExit Run()
    {
        if (Enter() == 0) return VmExit.Decode(RunPage);
        var errno = Marshal.GetLastPInvokeError();
        if (errno is Native.EINTR or Native.EAGAIN)
        {
            var page = RunPage;
            page.ImmediateExit = false;
            return VmExit.Intr.Instance;
        }
        throw new KvmException($"KVM_RUN(vcpu {Id})", errno);
    }

    /// <summary>The raw KVM_RUN without decoding: returns the exit reason (for the raw benchmark loop).</summary>
    public KvmExitReason RunRaw()
    {
        if (Enter() == 0) return RunPage.ExitReason;
        var errno = Marshal.GetLastPInvokeError();
        if (errno is Native.EINTR or Native.EAGAIN)
        {
            var page = RunPage;
            page.ImmediateExit = false;
            return KvmExitReason.Intr;
        }
        throw new KvmException($"KVM_RUN(vcpu {Id})", errno);
    }

    /// <summary>
    /// Announces an entry: from here until KVM_RUN returns, a <see cref="Kick"/> from another thread
    /// signals this one. The caller then looks for work it must do first and calls <see cref="Run"/>,
    /// or <see cref="CancelRun"/> when it found some. Clears a stale immediate_exit, so a kick that
    /// came while the vcpu was out of the guest (and that the caller sees as its work) costs no
    /// empty KVM_RUN. Ordering: a kicker publishes its work, sets immediate_exit, then reads the
    /// entry mark; this sets the mark (full fence), then the caller reads the work. Either the kicker
    /// sees the mark and signals, or the caller sees the work.
    /// </summary>
    public void PrepareToRun()
    {
        var page = RunPage;
        page.ImmediateExit = false;
        Interlocked.Exchange(ref _inRun, 1);
    }

    /// <summary>The entry announced by <see cref="PrepareToRun"/> will not happen.</summary>
    public void CancelRun() => Volatile.Write(ref _inRun, 0);

    /// <summary>KVM_RUN with the entry mark set around it.</summary>
    private int Enter()
    {
        // After PrepareToRun the mark is set (with its fence) already; without it, set it here (a
        // kick before this leaves immediate_exit set).
        if (Volatile.Read(ref _inRun) == 0) Interlocked.Exchange(ref _inRun, 1);
        try
        {
            return Native.Ioctl(_fd, KvmIoctl.Run, 0);
        }
        finally
        {
            Volatile.Write(ref _inRun, 0);
        }
    }

    public void CompleteIoIn(int index, ulong value)
    {
        var run = RunPage;
        var size = run.IoSize;
        var data = run.IoData;
        var at = index * size;
        if (at < 0 || at + size > data.Length) return;
        VmExit.WriteLittle(data.Slice(at, size), value);
    }

    public void CompleteMmioRead(ulong value)
    {
        var run = RunPage;
        var data = run.MmioData;
        var len = (int)Math.Min(run.MmioLen, 8u);
        VmExit.WriteLittle(data[..len], value);
    }

    public void CompleteMsrRead(ulong value, bool fault)
    {
        var run = RunPage;
        run.MsrData = value;
        run.MsrError = fault ? (byte)1 : (byte)0;
    }

    public void CompleteMsrWrite(bool fault)
    {
        var run = RunPage;
        run.MsrError = fault ? (byte)1 : (byte)0;
    }

    public KvmRegs GetRegisters()
    {
        KvmRegs regs;
        // SAFETY: regs is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_regs, alive for the whole call; the ioctl reads or writes only that
        // struct.
        if (Native.Ioctl(_fd, KvmIoctl.GetRegs, &regs) < 0) throw KvmException.Last($"KVM_GET_REGS(vcpu {Id})");
        return regs;
    }

    public void SetRegisters(in KvmRegs regs)
    {
        // SAFETY: regs is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_regs, alive for the whole call; the ioctl reads or writes only that
        // struct.
        fixed (KvmRegs* p = &regs)
            if (Native.Ioctl(_fd, KvmIoctl.SetRegs, p) < 0) throw KvmException.Last($"KVM_SET_REGS(vcpu {Id})");
    }

    public KvmSregs GetSpecialRegisters()
    {
        KvmSregs sregs;
        // SAFETY: sregs is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_sregs, alive for the whole call; the ioctl reads or writes only that
        // struct.
        if (Native.Ioctl(_fd, KvmIoctl.GetSregs, &sregs) < 0) throw KvmException.Last($"KVM_GET_SREGS(vcpu {Id})");
        return sregs;
    }

    public void SetSpecialRegisters(in KvmSregs sregs)
    {
        // SAFETY: sregs is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_sregs, alive for the whole call; the ioctl reads or writes only that
        // struct.
        fixed (KvmSregs* p = &sregs)
            if (Native.Ioctl(_fd, KvmIoctl.SetSregs, p) < 0) throw KvmException.Last($"KVM_SET_SREGS(vcpu {Id})");
    }

    public KvmFpu GetFpu()
    {
        KvmFpu fpu;
        // SAFETY: fpu is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_fpu, alive for the whole call; the ioctl reads or writes only that
        // struct.
        if (Native.Ioctl(_fd, KvmIoctl.GetFpu, &fpu) < 0) throw KvmException.Last($"KVM_GET_FPU(vcpu {Id})");
        return fpu;
    }

    public void SetFpu(in KvmFpu fpu)
    {
        // SAFETY: fpu is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_fpu, alive for the whole call; the ioctl reads or writes only that
        // struct.
        fixed (KvmFpu* p = &fpu)
            if (Native.Ioctl(_fd, KvmIoctl.SetFpu, p) < 0) throw KvmException.Last($"KVM_SET_FPU(vcpu {Id})");
    }

    /// <summary>KVM_GET_MSRS for the given indices; returns (index, value) for those KVM knows.</summary>
    public KvmMsrEntry[] GetMsrs(params uint[] indices)
    {
        var buffer = new byte[8 + 16 * indices.Length];
        // SAFETY: buffer is pinned for the block and holds struct kvm_msrs: nmsrs in its first 4 bytes,
        // then indices.Length 16-byte kvm_msr_entry records; KVM touches no more than nmsrs entries.
        fixed (byte* p = buffer)
        {
            *(uint*)p = (uint)indices.Length;
            var entries = (KvmMsrEntry*)(p + 8);
            for (var i = 0; i < indices.Length; i++) entries[i].Index = indices[i];
            var n = Native.Ioctl(_fd, KvmIoctl.GetMsrs, p);
            if (n < 0) throw KvmException.Last($"KVM_GET_MSRS(vcpu {Id})");
            var result = new KvmMsrEntry[n];
            for (var i = 0; i < n; i++) result[i] = entries[i];
            return result;
        }
    }

    /// <summary>KVM_SET_MSRS; throws if KVM did not take every entry.</summary>
    public void SetMsrs(params KvmMsrEntry[] msrs)
    {
        var buffer = new byte[8 + 16 * msrs.Length];
        // SAFETY: buffer is pinned for the block and holds struct kvm_msrs: nmsrs in its first 4 bytes,
        // then msrs.Length 16-byte kvm_msr_entry records; KVM reads no more than nmsrs entries.
        fixed (byte* p = buffer)
        {
            *(uint*)p = (uint)msrs.Length;
            var entries = (KvmMsrEntry*)(p + 8);
            for (var i = 0; i < msrs.Length; i++) entries[i] = msrs[i];
            var n = Native.Ioctl(_fd, KvmIoctl.SetMsrs, p);
            if (n < 0) throw KvmException.Last($"KVM_SET_MSRS(vcpu {Id})");
            if (n != msrs.Length)
                throw new KvmException($"KVM_SET_MSRS(vcpu {Id}): MSR 0x{msrs[n].Index:X} refused");
        }
    }

    public void SetCpuid(KvmCpuidEntry2[] entries)
    {
        var buffer = new byte[8 + sizeof(KvmCpuidEntry2) * entries.Length];
        // SAFETY: buffer is pinned for the block and holds struct kvm_cpuid2: nent in its first 4
        // bytes, then entries.Length kvm_cpuid_entry2 records; KVM reads no more than nent entries.
        fixed (byte* p = buffer)
        {
            *(uint*)p = (uint)entries.Length;
            var dst = (KvmCpuidEntry2*)(p + 8);
            for (var i = 0; i < entries.Length; i++) dst[i] = entries[i];
            if (Native.Ioctl(_fd, KvmIoctl.SetCpuid2, p) < 0) throw KvmException.Last($"KVM_SET_CPUID2(vcpu {Id})");
        }
    }

    public bool InterruptsEnabled => RunPage.IfFlag;

    public ulong Cr8
    {
        get => RunPage.Cr8;
        set
        {
            var page = RunPage;
            page.Cr8 = value;
        }
    }
    public bool ReadyForInterruptInjection => RunPage.ReadyForInterruptInjection;

    public bool RequestInterruptWindow
    {
        set
        {
            var run = RunPage;
            run.RequestInterruptWindow = value;
        }
    }

    public void InjectInterrupt(byte vector)
    {
        uint irq = vector;
        // SAFETY: irq is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_interrupt (one 32-bit vector), alive for the whole call; the ioctl reads
        // or writes only that struct.
        if (Native.Ioctl(_fd, KvmIoctl.Interrupt, &irq) < 0) throw KvmException.Last($"KVM_INTERRUPT(vcpu {Id}, vector {vector})");
    }

    /// <summary>Size of KVM's local APIC register image (struct kvm_lapic_state).</summary>
    public const int LapicStateSize = 1024;

    /// <summary>KVM_GET_LAPIC: the in-kernel local APIC's registers, at the offsets of the APIC
    /// page (0x20 ID, 0x80 TPR, 0x100 ISR, ...). Only with an in-kernel (or split) irqchip.</summary>
    public byte[] GetLapic()
    {
        var state = new byte[LapicStateSize];
        // SAFETY: state is pinned for the call and is LapicStateSize bytes, struct kvm_lapic_state, all
        // KVM writes.
        fixed (byte* p = state)
            if (Native.Ioctl(_fd, KvmIoctl.GetLapic, p) < 0) throw KvmException.Last($"KVM_GET_LAPIC(vcpu {Id})");
        return state;
    }

    /// <summary>KVM_SET_LAPIC: replaces the in-kernel local APIC's registers.</summary>
    public void SetLapic(ReadOnlySpan<byte> state)
    {
        if (state.Length != LapicStateSize) throw new ArgumentException($"a local APIC image is {LapicStateSize} bytes, not {state.Length}", nameof(state));
        // SAFETY: state is pinned for the call and is LapicStateSize bytes (checked above), struct
        // kvm_lapic_state, all KVM reads.
        fixed (byte* p = state)
            if (Native.Ioctl(_fd, KvmIoctl.SetLapic, p) < 0) throw KvmException.Last($"KVM_SET_LAPIC(vcpu {Id})");
    }

    /// <summary>KVM_GET_TSC_KHZ: the frequency of the guest's TSC in kHz.</summary>
    public long GetTscKhz()
    {
        var khz = Native.Ioctl(_fd, KvmIoctl.GetTscKhz, 0);
        if (khz <= 0) throw KvmException.Last($"KVM_GET_TSC_KHZ(vcpu {Id})");
        return khz;
    }

    /// <summary>IA32_TSC: the guest's time-stamp counter now, as KVM computes it (what RDTSC in the guest returns).</summary>
    public ulong GetGuestTsc()
    {
        var entries = GetMsrs(0x10);
        if (entries.Length != 1) throw new KvmException($"KVM_GET_MSRS(IA32_TSC, vcpu {Id}) returned no value");
        return entries[0].Data;
    }

    /// <summary>KVM_GET_MP_STATE: runnable, halted, waiting for SIPI, ... (in-kernel local APIC only).</summary>
    public KvmMpState GetMpState()
    {
        uint state;
        // SAFETY: state is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_mp_state, alive for the whole call; the ioctl reads or writes only that
        // struct.
        if (Native.Ioctl(_fd, KvmIoctl.GetMpState, &state) < 0) throw KvmException.Last($"KVM_GET_MP_STATE(vcpu {Id})");
        return (KvmMpState)state;
    }

    public void SetMpState(KvmMpState state)
    {
        var value = (uint)state;
        // SAFETY: value is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_mp_state, alive for the whole call; the ioctl reads or writes only that
        // struct.
        if (Native.Ioctl(_fd, KvmIoctl.SetMpState, &value) < 0) throw KvmException.Last($"KVM_SET_MP_STATE(vcpu {Id}, {state})");
    }

    public void InjectNmi()
    {
        if (Native.Ioctl(_fd, KvmIoctl.Nmi, 0) < 0) throw KvmException.Last($"KVM_NMI(vcpu {Id})");
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct KvmTranslation
    {
        public ulong LinearAddress, PhysicalAddress;
        public byte Valid, Writeable, Usermode;
        public byte Pad0, Pad1, Pad2, Pad3, Pad4;
    }

    public bool TryTranslate(ulong linearAddress, out GuestPhysAddr physical)
    {
        var t = new KvmTranslation { LinearAddress = linearAddress };
        // SAFETY: t is a local (or a readonly reference pinned by fixed) with the layout of the
        // kernel's struct kvm_translation, alive for the whole call; the ioctl reads or writes only
        // that struct.
        if (Native.Ioctl(_fd, KvmIoctl.Translate, &t) < 0 || t.Valid == 0)
        {
            physical = default;
            return false;
        }
        physical = new GuestPhysAddr(t.PhysicalAddress);
        return true;
    }

    internal void MapDirtyRing(uint bytes) => _dirtyRing = new DirtyRing(_fd, Id, bytes);

    /// <summary>This vcpu's dirty ring, if its VM enabled one before creating it.</summary>
    public DirtyRing? DirtyRing => _dirtyRing;

    public bool HasDirtyRing => _dirtyRing is not null;

    /// <summary>
    /// Harvests this vcpu's dirty ring and resets the harvested entries (KVM_RESET_DIRTY_RINGS, which
    /// write-protects those pages again before this returns): the guest frame numbers the vcpu wrote
    /// since the last harvest, in ring order (a page may appear twice if it was written again after
    /// an earlier reset), and whether the ring was full (writes may have gone unreported). Entries
    /// naming a slot the VM no longer has are dropped. Empty without a ring.
    /// On the vcpu's thread, outside KVM_RUN: leaving KVM_RUN flushes what the processor still buffers.
    /// </summary>
    public DirtyRingHarvest HarvestDirtyRing()
    {
        if (_dirtyRing is null || _vm is null) return DirtyRingHarvest.Empty;
        _harvest.Clear();
        var n = _dirtyRing.Harvest(_harvest);
        if (n == 0) return DirtyRingHarvest.Empty;
        var gfns = new List<ulong>(_harvest.Count);
        foreach (var (slot, offset) in _harvest)
            if (_vm.TryGfn(slot, offset, out var gfn)) gfns.Add(gfn);
        _vm.ResetDirtyRings();
        return new DirtyRingHarvest([.. gfns], RingWasFull: n == _dirtyRing.Entries);
    }

    public void BindToCurrentThread() => _tid = KickSignal.CurrentThreadId();

    /// <summary>Sets immediate_exit, then signals the vcpu thread (if bound). Safe from any thread;
    /// a message told before the kick is seen by the vcpu before it next enters the guest.
    /// From the vcpu's own thread it does nothing: that thread is not in KVM_RUN, and the vcpu
    /// loop looks at its mailbox before it enters again (an actor that runs on its sender's
    /// thread, such as a vlapic, tells its vcpu from there).</summary>
    public void Kick()
    {
        if (_fd < 0) return;
        if (_tid != 0 && _tid == KickSignal.CurrentThreadId()) return;
        var run = RunPage;
        run.ImmediateExit = true;
        Interlocked.MemoryBarrier(); // the caller's work and immediate_exit before the look at the entry mark
        // Out of KVM_RUN and not about to enter: no signal (it would only wake the thread for
        // nothing, from a sleep or a device wait). The vcpu looks for work before its next entry,
        // and immediate_exit makes an entry that raced with this return at once.
        if (Volatile.Read(ref _inRun) == 0) return;
        var tid = _tid;
        if (tid != 0) KickSignal.SendTo(tid);
    }

    public void Dispose()
    {
        if (_fd < 0) return;
        _dirtyRing?.Dispose();
        Native.Munmap(_run, (nuint)_runSize);
        Native.Close(_fd);
        _fd = -1;
    }
}
