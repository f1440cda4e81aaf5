namespace ActorVmm.LibVmm;

/// <summary>
/// One virtual CPU as the vcpu actor sees it. <see cref="VcpuHandle"/> is the KVM implementation;
/// a unit test of the actor may script exits with its own. All members except <see cref="Kick"/>
/// are called on the vcpu's own thread.
/// </summary>
public interface IVcpu : IDisposable
{
    int Id { get; }

    /// <summary>Enters the guest until the next exit (KVM_RUN) and decodes it.</summary>
    VmExit Run();

    /// <summary>Supplies element <paramref name="index"/> of a pending IN exit.</summary>
    void CompleteIoIn(int index, ulong value);

    /// <summary>Supplies the value of a pending MMIO read.</summary>
    void CompleteMmioRead(ulong value);

    /// <summary>Answers a pending RDMSR exit; <paramref name="fault"/> makes the guest take #GP.</summary>
    void CompleteMsrRead(ulong value, bool fault);

    /// <summary>Answers a pending WRMSR exit; <paramref name="fault"/> makes the guest take #GP.</summary>
    void CompleteMsrWrite(bool fault);

    KvmRegs GetRegisters();
    void SetRegisters(in KvmRegs regs);
    KvmSregs GetSpecialRegisters();
    void SetSpecialRegisters(in KvmSregs sregs);

    /// <summary>RFLAGS.IF as of the last exit.</summary>
    bool InterruptsEnabled { get; }

    /// <summary>Whether KVM_INTERRUPT would be accepted now (as of the last exit).</summary>
    bool ReadyForInterruptInjection { get; }

    /// <summary>Asks KVM to exit as soon as the guest can take an interrupt.</summary>
    bool RequestInterruptWindow { set; }

    /// <summary>
    /// <c>kvm_run.cr8</c>, without an in-kernel local APIC: the guest's CR8 (TPR[7:4]) as of the last
    /// exit, and what KVM loads into CR8 at the next entry (so a TPR the guest wrote through its
    /// APIC page reaches CR8 by setting it here).
    /// </summary>
    ulong Cr8 { get => 0; set { } }

    /// <summary>Queues an external interrupt (KVM_INTERRUPT).</summary>
    void InjectInterrupt(byte vector);

    /// <summary>Queues an NMI (KVM_NMI); KVM delivers it when NMIs are not blocked.</summary>
    void InjectNmi();

    /// <summary>Translates a linear address through the vcpu's current paging mode
    /// (KVM_TRANSLATE). False when the address is not mapped.</summary>
    bool TryTranslate(ulong linearAddress, out GuestPhysAddr physical);

    /// <summary>KVM_GET_MP_STATE (only with an in-kernel local APIC).</summary>
    KvmMpState GetMpState() => throw new NotSupportedException("no in-kernel local APIC: KVM keeps no MP state");

    /// <summary>KVM_SET_MP_STATE (in-kernel local APIC only).</summary>
    void SetMpState(KvmMpState state) => throw new NotSupportedException("no in-kernel local APIC: KVM keeps no MP state");

    /// <summary>KVM_GET_LAPIC: the in-kernel local APIC's 1 KiB register image.</summary>
    byte[] GetLapic() => throw new NotSupportedException("no in-kernel local APIC");

    /// <summary>KVM_SET_LAPIC.</summary>
    void SetLapic(ReadOnlySpan<byte> registers) => throw new NotSupportedException("no in-kernel local APIC");

    /// <summary>Everything KVM holds of this vcpu, for a snapshot (see <see cref="VcpuHandle.SaveState"/>).</summary>
    VcpuKvmState SaveState() => throw new NotSupportedException("this vcpu has no KVM state to save");

    /// <summary>Writes a saved state back, in the order KVM requires (see <see cref="VcpuHandle.RestoreState"/>).</summary>
    void RestoreState(VcpuKvmState state) => throw new NotSupportedException("this vcpu has no KVM state to restore");

    /// <summary>KVM_GET_MSRS for the given indices; (index, value) for those KVM knows.</summary>
    KvmMsrEntry[] GetMsrs(params uint[] indices) => [];

    /// <summary>KVM_SET_MSRS, host-initiated; throws if KVM does not take every entry.</summary>
    void SetMsrs(params KvmMsrEntry[] msrs) => throw new NotSupportedException("this vcpu has no KVM MSRs");

    /// <summary>Whether this vcpu has a KVM dirty ring to harvest.</summary>
    bool HasDirtyRing => false;

    /// <summary>Harvests and resets this vcpu's dirty ring: the guest frame numbers written since the
    /// last harvest (see <see cref="VcpuHandle.HarvestDirtyRing"/>). Empty without a ring.</summary>
    DirtyRingHarvest HarvestDirtyRing() => DirtyRingHarvest.Empty;

    /// <summary>Records the calling thread as this vcpu's thread (the kick target).</summary>
    void BindToCurrentThread();

    /// <summary>Makes the vcpu leave (or not enter) the guest soon. Any thread; never blocks.</summary>
    void Kick();

    /// <summary>Announces an entry (see <see cref="VcpuHandle.PrepareToRun"/>): call it, then look for
    /// work, then <see cref="Run"/> or <see cref="CancelRun"/>.</summary>
    void PrepareToRun() { }

    /// <summary>The announced entry will not happen.</summary>
    void CancelRun() { }
}
