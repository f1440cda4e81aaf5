using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>One MSR's value as KVM_GET_MSRS gives it and KVM_SET_MSRS takes it.</summary>
public sealed record MsrValue(uint Index, ulong Value);

/// <summary>One extended control register (XCR0 is index 0) as KVM_GET_XCRS gives it.</summary>
public sealed record XcrValue(uint Index, ulong Value);

/// <summary>
/// Everything KVM holds of one vcpu, as <see cref="VcpuHandle.SaveState"/> reads it and
/// <see cref="VcpuHandle.RestoreState"/> writes it back. The KVM structs are kept as their raw images
/// (the kernel's x86-64 layout, sizes in <see cref="KvmStateSizes"/>), so the record holds plain data
/// only and a snapshot format can store it as is; the typed views decode them. Two states are equal
/// when every part is equal byte for byte.
/// </summary>
public sealed record VcpuKvmState
{
    /// <summary><c>struct kvm_regs</c>: general registers, RIP, RFLAGS.</summary>
    public required byte[] Registers { get; init; }

    /// <summary><c>struct kvm_sregs</c>: segments, descriptor tables, CR0-CR4, CR8, EFER, APIC base,
    /// the bitmap of an interrupt KVM has not injected yet.</summary>
    public required byte[] SpecialRegisters { get; init; }

    /// <summary><c>struct kvm_fpu</c>: x87 and SSE state (the FXSAVE image's fields).</summary>
    public required byte[] Fpu { get; init; }

    /// <summary><c>struct kvm_xsave</c> (4096 bytes), or null when KVM has no KVM_CAP_XSAVE (the
    /// x87/SSE state is then <see cref="Fpu"/> alone).</summary>
    public byte[]? Xsave { get; init; }

    /// <summary>KVM_GET_XCRS (empty without KVM_CAP_XCRS).</summary>
    public XcrValue[] Xcrs { get; init; } = [];

    /// <summary><c>struct kvm_debugregs</c>: DR0-DR3, DR6, DR7.</summary>
    public required byte[] DebugRegisters { get; init; }

    /// <summary>The MSRs of <see cref="SavedMsrs"/> this KVM could read, in restore order.</summary>
    public required MsrValue[] Msrs { get; init; }

    /// <summary><c>struct kvm_vcpu_events</c>: pending/injected exception, interrupt and NMI, interrupt
    /// shadow, NMI mask, SIPI vector, SMM.</summary>
    public required byte[] Events { get; init; }

    /// <summary>KVM's MP state; null when the VM has no KVM local APIC (user space keeps INIT/SIPI then).</summary>
    public KvmMpState? MpState { get; init; }

    /// <summary><c>struct kvm_lapic_state</c> (1 KiB); null when the VM has no KVM local APIC.</summary>
    public byte[]? Lapic { get; init; }

    // Views of the parts as KVM's structs: methods, not properties, so the record's data (what JSON and
    // Hyperion carry) is the byte arrays alone.
    public KvmRegs GetRegs() => View<KvmRegs>(Registers, KvmStateSizes.Regs, nameof(Registers));
    public KvmSregs GetSregs() => View<KvmSregs>(SpecialRegisters, KvmStateSizes.Sregs, nameof(SpecialRegisters));
    public KvmFpu GetFpu() => View<KvmFpu>(Fpu, KvmStateSizes.Fpu, nameof(Fpu));
    public KvmDebugRegs GetDebugRegs() => View<KvmDebugRegs>(DebugRegisters, KvmStateSizes.DebugRegs, nameof(DebugRegisters));
    public KvmVcpuEvents GetVcpuEvents() => View<KvmVcpuEvents>(Events, KvmStateSizes.VcpuEvents, nameof(Events));

    /// <summary>The guest's IA32_TSC when it was saved, if KVM gave it.</summary>
    public ulong? Tsc => Msr(SavedMsrs.Tsc);

    /// <summary>The saved value of MSR <paramref name="index"/>, or null if it was not saved.</summary>
    public ulong? Msr(uint index)
    {
        foreach (var m in Msrs)
            if (m.Index == index) return m.Value;
        return null;
    }

    /// <summary>
    /// Checks that every part has the size of its KVM struct, so a truncated or foreign state is
    /// refused before anything reaches KVM. Throws <see cref="ArgumentException"/> naming the part.
    /// </summary>
    public void Validate()
    {
        Size(Registers, KvmStateSizes.Regs, nameof(Registers));
        Size(SpecialRegisters, KvmStateSizes.Sregs, nameof(SpecialRegisters));
        Size(Fpu, KvmStateSizes.Fpu, nameof(Fpu));
        Size(DebugRegisters, KvmStateSizes.DebugRegs, nameof(DebugRegisters));
        Size(Events, KvmStateSizes.VcpuEvents, nameof(Events));
        if (Xsave is not null) Size(Xsave, KvmStateSizes.Xsave, nameof(Xsave));
        if (Lapic is not null) Size(Lapic, KvmStateSizes.Lapic, nameof(Lapic));
        if (Xcrs.Length > KvmStateSizes.MaxXcrs)
            throw new ArgumentException($"vcpu state: {Xcrs.Length} XCRs, KVM takes at most {KvmStateSizes.MaxXcrs}", nameof(Xcrs));
        if ((Lapic is null) != (MpState is null))
            throw new ArgumentException("vcpu state: a KVM local APIC image and an MP state come together (both or neither)", nameof(Lapic));
    }

    /// <summary>A struct's raw image.</summary>
    public static byte[] Image<T>(in T value) where T : unmanaged => MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in value)).ToArray();

    private static T View<T>(byte[] image, int size, string part) where T : unmanaged
    {
        Size(image, size, part);
        return MemoryMarshal.Read<T>(image);
    }

    private static void Size(byte[]? image, int size, string part)
    {
        if (image is null) throw new ArgumentException($"vcpu state: {part} is missing", part);
        if (image.Length != size) throw new ArgumentException($"vcpu state: {part} is {image.Length} bytes, KVM's struct is {size}", part);
    }

    public bool Equals(VcpuKvmState? other) =>
        other is not null &&
        Registers.AsSpan().SequenceEqual(other.Registers) &&
        SpecialRegisters.AsSpan().SequenceEqual(other.SpecialRegisters) &&
        Fpu.AsSpan().SequenceEqual(other.Fpu) &&
        SameBytes(Xsave, other.Xsave) &&
        Xcrs.AsSpan().SequenceEqual(other.Xcrs) &&
        DebugRegisters.AsSpan().SequenceEqual(other.DebugRegisters) &&
        Msrs.AsSpan().SequenceEqual(other.Msrs) &&
        Events.AsSpan().SequenceEqual(other.Events) &&
        MpState == other.MpState &&
        SameBytes(Lapic, other.Lapic);

    public override int GetHashCode()
    {
        var hash = new HashCode();
        hash.AddBytes(Registers);
        hash.AddBytes(SpecialRegisters);
        hash.Add(Msrs?.Length ?? 0); // null only in a record not yet validated (a snapshot being read)
        hash.Add(MpState);
        return hash.ToHashCode();
    }

    private static bool SameBytes(byte[]? a, byte[]? b) => a is null ? b is null : b is not null && a.AsSpan().SequenceEqual(b);
}

/// <summary>
/// The VM-wide KVM state a snapshot keeps: the kvmclock (KVM_GET_CLOCK) and the host's
/// CLOCK_REALTIME at the same instant (KVM's own pairing when it reports <see cref="KvmClockData.RealtimeValid"/>,
/// else one read right after the ioctl). <see cref="Flags"/> are KVM's KVM_CLOCK_* flags;
/// <see cref="HostTsc"/> is the host TSC at that instant when KVM gave it.
/// </summary>
public sealed record VmKvmState(ulong Clock, uint Flags, long RealtimeNs, ulong? HostTsc)
{
    /// <summary>
    /// The kvmclock to set on restore when KVM cannot do the realtime step itself: the saved clock,
    /// plus, when <paramref name="bringWallClockToNow"/>, the host realtime elapsed since the save.
    /// Never below the saved clock: a host realtime earlier than the saved one (clock stepped back,
    /// another host) adds nothing.
    /// </summary>
    public ulong ClockAt(long nowRealtimeNs, bool bringWallClockToNow) =>
        bringWallClockToNow && nowRealtimeNs > RealtimeNs ? Clock + (ulong)(nowRealtimeNs - RealtimeNs) : Clock;
}

/// <summary>
/// The MSRs a vcpu snapshot saves: the ones below that KVM_GET_MSR_INDEX_LIST reports, in the order
/// they are restored. Guest state KVM keeps in MSRs and nowhere else; not listed, with the reason:
/// EFER, FS.base, GS.base and IA32_APIC_BASE (in <c>kvm_sregs</c>, restored with it: the APIC base and
/// mode must be in place before the local APIC image, which KVM reads by mode); the feature MSRs
/// (ARCH_CAPABILITIES, PERF_CAPABILITIES, PLATFORM_INFO, VMX capabilities: CPU-model constants the
/// VMM sets when it builds the vcpu, as CPUID); the performance counters, machine-check banks,
/// nested-virtualization state (VM_HSAVE_PA), and the MTRRs, which KVM_GET_MSR_INDEX_LIST does not
/// list (a guest's MTRR writes are not saved yet). QEMU's kvm_put_msrs and Firecracker's
/// msrs_to_save choose alike.
/// </summary>
public static class SavedMsrs
{
    public const uint Tsc = 0x10;
    public const uint FeatureControl = 0x3A;
    public const uint TscAdjust = 0x3B;
    public const uint SpecCtrl = 0x48;
    public const uint SysenterCs = 0x174, SysenterEsp = 0x175, SysenterEip = 0x176;
    public const uint MiscEnable = 0x1A0;
    public const uint Pat = 0x277;
    public const uint TscDeadline = 0x6E0;
    public const uint Star = 0xC000_0081, Lstar = 0xC000_0082, Cstar = 0xC000_0083, Sfmask = 0xC000_0084;
    public const uint KernelGsBase = 0xC000_0102;
    public const uint TscAux = 0xC000_0103;
    public const uint AmdVirtSpecCtrl = 0xC001_011F;
    public const uint KvmWallClockNew = 0x4B56_4D00, KvmSystemTimeNew = 0x4B56_4D01;
    public const uint KvmAsyncPfEn = 0x4B56_4D02, KvmStealTime = 0x4B56_4D03, KvmPvEoiEn = 0x4B56_4D04;
    public const uint KvmPollControl = 0x4B56_4D05, KvmAsyncPfInt = 0x4B56_4D06;

    /// <summary>
    /// Every MSR a snapshot may save, in restore order, with why:
    /// IA32_TSC first (the TSC the others are relative to; see <see cref="VcpuHandle.RestoreState"/>),
    /// IA32_TSC_ADJUST (what the guest reads after it wrote its TSC), IA32_FEATURE_CONTROL (its lock
    /// bit, SDM Vol 3C §23.7), IA32_SPEC_CTRL and the AMD VIRT_SPEC_CTRL (the guest's speculation
    /// mitigations: lost, they are silently off), SYSENTER_CS/ESP/EIP, IA32_MISC_ENABLE, IA32_PAT,
    /// STAR/LSTAR/CSTAR/SFMASK and KERNEL_GS_BASE (SYSCALL and SWAPGS, SDM Vol 3A §5.8.8),
    /// IA32_TSC_AUX (RDTSCP/RDPID), then KVM's paravirtual MSRs: the kvmclock pair (its wall clock
    /// and per-vcpu time page), steal time, PV EOI (lost, a guest that saw the PV EOI bit skips
    /// its EOI and the vector stays in service), poll control, and async page faults with
    /// ASYNC_PF_INT before ASYNC_PF_EN (KVM refuses an enable whose vector is not set yet).
    /// <see cref="TscDeadline"/> comes last and only with KVM's local APIC: KVM ignores it unless
    /// the restored LVT timer is in TSC-deadline mode, and it is an absolute value of the TSC
    /// restored before it.
    /// </summary>
    public static IReadOnlyList<uint> RestoreOrder { get; } =
    [
        Tsc, TscAdjust, FeatureControl, SpecCtrl, AmdVirtSpecCtrl,
        SysenterCs, SysenterEsp, SysenterEip, MiscEnable, Pat,
        Star, Lstar, Cstar, Sfmask, KernelGsBase, TscAux,
        KvmWallClockNew, KvmSystemTimeNew, KvmStealTime, KvmPvEoiEn, KvmPollControl, KvmAsyncPfInt, KvmAsyncPfEn,
        TscDeadline,
    ];

    /// <summary>The MSRs to save on this KVM: <see cref="RestoreOrder"/> ∩ <paramref name="kvmIndexList"/>
    /// (KVM_GET_MSR_INDEX_LIST), without <see cref="TscDeadline"/> unless the VM has KVM's local APIC.</summary>
    public static uint[] ToSave(IReadOnlyCollection<uint> kvmIndexList, bool kvmLocalApic)
    {
        var listed = kvmIndexList as ISet<uint> ?? kvmIndexList.ToHashSet();
        return [.. RestoreOrder.Where(i => listed.Contains(i) && (kvmLocalApic || i != TscDeadline))];
    }
}
