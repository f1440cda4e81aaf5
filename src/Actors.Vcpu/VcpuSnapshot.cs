using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>
/// Everything a paused vcpu needs to go on in another VM built the same way (a snapshot's vcpu part,
/// <see cref="VcpuProtocol.SavedState"/>): KVM's state of the vcpu, and the user-space state KVM does
/// not hold. Plain data: it round-trips through System.Text.Json (camelCase, enums as strings).
/// What it leaves out, on purpose: the vlapic's pending vector (the vlapic owns it, in its IRR, and
/// offers it again to the vcpu it is attached to: <c>VlapicProtocol.Props(..., initial)</c>), the
/// write windows of the devices (the VM is drained before it is saved: every posted write is
/// credited) and the reply in flight (a vcpu pauses only at an instruction boundary, without one).
/// </summary>
/// <param name="VcpuId">the vcpu it was saved from (a restore checks it against the vcpu it goes into)</param>
/// <param name="Kvm">KVM's state (<see cref="VcpuHandle.SaveState"/>; with <c>lapic = assisted</c>, KVM's
/// local APIC and MP state are in it)</param>
/// <param name="ResumeIn">the state the vcpu was in when it paused, and goes on in after a restore:
/// <see cref="VcpuProtocol.State.Running"/>, <see cref="VcpuProtocol.State.Halted"/> (until an
/// interrupt, NMI or INIT), <see cref="VcpuProtocol.State.WaitingForSipi"/> (an AP after INIT) or
/// <see cref="VcpuProtocol.State.Created"/> (an AP that was never started)</param>
/// <param name="Interrupts">what was pending for the vcpu's next entries and not yet given to KVM</param>
/// <param name="WakePending">a wake-up reached the running vcpu: its next HLT must not sleep</param>
public sealed record VcpuSnapshot(
    int VcpuId,
    VcpuKvmState Kvm,
    VcpuProtocol.State ResumeIn,
    PendingInterruptsState Interrupts,
    bool WakePending = false)
{
    /// <summary>The states a vcpu can be saved in and resumed to.</summary>
    public static bool IsResumable(VcpuProtocol.State state) =>
        state is VcpuProtocol.State.Running or VcpuProtocol.State.Halted or VcpuProtocol.State.WaitingForSipi or VcpuProtocol.State.Created;

    /// <summary>
    /// Checks the snapshot before anything reaches KVM: a state it can resume in, a vector-free NMI
    /// count within what a processor latches, and KVM's parts of the sizes of their structs. Throws
    /// <see cref="ArgumentException"/> naming what is wrong.
    /// </summary>
    public void Validate(int vcpuId)
    {
        if (VcpuId != vcpuId) throw new ArgumentException($"the snapshot is of vcpu {VcpuId}, not of vcpu {vcpuId}");
        if (Kvm is null) throw new ArgumentException($"vcpu {VcpuId}: the snapshot has no KVM state");
        if (!IsResumable(ResumeIn)) throw new ArgumentException($"vcpu {VcpuId}: a vcpu cannot resume in state {ResumeIn}");
        if (Interrupts is null) throw new ArgumentException($"vcpu {VcpuId}: the snapshot has no pending-interrupt state");
        if (Interrupts.Nmis is < 0 or > InterruptInjector.MaxNmisPerEntry)
            throw new ArgumentException($"vcpu {VcpuId}: {Interrupts.Nmis} pending NMIs, a processor keeps at most {InterruptInjector.MaxNmisPerEntry}");
        if (Interrupts.Cr8 > 0xF) throw new ArgumentException($"vcpu {VcpuId}: CR8 0x{Interrupts.Cr8:X} is not a priority class (0-15)");
        Kvm.Validate();
    }
}

/// <summary>
/// The user-space part of a vcpu's interrupts (<see cref="InterruptInjector"/>) that outlives a
/// save: vectors asked for with <see cref="VcpuProtocol.InjectInterrupt"/> and not injected yet, in
/// order; NMIs the vlapic reported that were not handed to KVM (KVM's own pending NMI is in
/// <see cref="VcpuKvmState.Events"/>); an ExtINT the vlapic reported (the 8259 gives its vector at the
/// next INTA); whether a vector went to KVM_INTERRUPT for an entry that did not happen (KVM holds it,
/// in its events: no second one may go in before an exit); the guest's CR8 as the vcpu last saw it;
/// and the count of injected vectors (a statistic).
/// </summary>
public sealed record PendingInterruptsState(
    byte[] Requested,
    int Nmis,
    bool ExtInt,
    bool Queued,
    byte Cr8,
    long Injected)
{
    public static readonly PendingInterruptsState None = new([], 0, false, false, 0, 0);

    public bool Equals(PendingInterruptsState? other) =>
        other is not null && Requested.AsSpan().SequenceEqual(other.Requested) && Nmis == other.Nmis && ExtInt == other.ExtInt
        && Queued == other.Queued && Cr8 == other.Cr8 && Injected == other.Injected;

    public override int GetHashCode() => HashCode.Combine(Requested.Length, Nmis, ExtInt, Queued, Cr8, Injected);
}
