using ActorVmm.Devices;

namespace ActorVmm.Lapic;

public enum LapicBackendKind
{
    /// <summary>Registers, timer and priorities in this process (<see cref="LocalApic"/>); the
    /// vcpu is told <c>InterruptPending</c> and injects with KVM_INTERRUPT.</summary>
    Emulated,

    /// <summary>KVM split irqchip: the LAPIC lives in the kernel; interrupts go in with
    /// KVM_SIGNAL_MSI, level EOIs come back as KVM_EXIT_IOAPIC_EOI (<see cref="KvmAssistedLapicBackend"/>).</summary>
    KvmAssisted,
}

/// <summary>
/// One vcpu's local APIC as its VlapicActor drives it: the seed's vmm_ops for the vlapic. The VM
/// chooses the kind once, when it is built (<see cref="LapicBackendFactory"/>), as bhyve installs
/// vlapic_ops only when the hardware can. The actor has one code path for every kind:
/// <list type="bullet">
/// <item><b>Emulated</b> (<see cref="EmulatedLapicBackend"/>): everything below is the model.</item>
/// <item><b>KvmAssisted</b> (<see cref="KvmAssistedLapicBackend"/>): the kernel's local APIC
/// (KVM_CAP_SPLIT_IRQCHIP). Guest MMIO/MSR accesses never exit to user space, so the access
/// methods are unused; <see cref="Deliver"/> is KVM_SIGNAL_MSI; <see cref="Eoi"/> turns a
/// KVM_EXIT_IOAPIC_EOI into <see cref="ILapicEvents.LevelEoi"/>; <see cref="PendingInterrupt"/> is
/// always null (the kernel injects: no <c>InterruptPending</c>, no kick: the posted-interrupt style
/// of issue 3 §3); the timer is in the kernel (<see cref="ITimedDevice.NextDeadline"/> null); the
/// state is KVM_GET_LAPIC's, read by the vcpu between two runs. The VM builder enables the split
/// irqchip before creating vcpus and installs no MSR filter for the APIC MSRs; the IOAPIC's
/// messages go to the kernel as one MSI each through the router (the kernel matches logical
/// destinations and arbitrates lowest priority); IPIs, INIT/SIPI and HLT never leave the kernel.</item>
/// </list>
/// Generic checks (vector legality, destination matching) happen in the backend so that an
/// assisted one can keep them where the kernel already does them.
/// </summary>
public interface ILapicBackend : ITimedDevice
{
    LapicBackendKind Kind { get; }

    /// <summary>xAPIC MMIO at an offset inside the 4 KiB page.</summary>
    ulong ReadMmio(ulong offset, int size);

    void WriteMmio(ulong offset, int size, ulong value);

    /// <summary>IA32_APIC_BASE, IA32_TSC_DEADLINE and x2APIC MSRs; false means #GP.</summary>
    bool ReadMsr(uint msr, out ulong value);

    bool WriteMsr(uint msr, ulong value);

    /// <summary>Whether a message with this destination is for this APIC (no shorthand).</summary>
    bool Matches(DestinationMode mode, uint destination);

    /// <summary>Delivers an interrupt message routed to this APIC (the seed's lapic_intr_* and
    /// vlapic_set_intr_ready). Non-IRR kinds come back through <see cref="ILapicEvents.VcpuEvent"/>.</summary>
    void Deliver(DeliveryMode mode, byte vector, bool level, TriggerMode trigger);

    /// <summary>An EOI the vcpu reports without the register page seeing it (assisted: the EOI
    /// exit of a level-triggered vector). Emulated: the same as a write to the EOI register
    /// when <paramref name="vector"/> is the one in service.</summary>
    void Eoi(byte vector);

    /// <summary>Highest vector the vcpu should take now, or null (vlapic_pending_intr).</summary>
    int? PendingInterrupt();

    /// <summary>Whether a fixed or lowest-priority interrupt would be taken now (the APIC is enabled
    /// globally and in software, SDM §10.4.7.2): lowest-priority arbitration passes over one that
    /// would not.</summary>
    bool AcceptsInterrupts => true;

    /// <summary>The TPR, which the vcpu mirrors in the guest's CR8; null when the backend keeps it
    /// where the vcpu need not (an in-kernel APIC: KVM syncs CR8 itself).</summary>
    byte? TaskPriority => null;

    /// <summary>IA32_APIC_BASE, which the vcpu mirrors: it decodes the xAPIC page where the base
    /// names it, and tells KVM, whose CPUID.01H:EDX.APIC follows its EN bit; null when the backend
    /// keeps it where the vcpu need not (an in-kernel APIC: KVM sees the guest's writes itself).</summary>
    ulong? ApicBase => null;

    /// <summary>The guest wrote CR8 (TPR = CR8 &lt;&lt; 4), seen by the vcpu at an exit.</summary>
    void SetTaskPriority(byte tpr) { }

    /// <summary>The vcpu injected <paramref name="vector"/> (vlapic_intr_accepted).</summary>
    void InterruptAccepted(byte vector);

    /// <summary>LINT0 (pin 0) and LINT1 (pin 1).</summary>
    IInterruptLine Lint(int pin);

    LapicState State();

    void Restore(LapicState state);
}

/// <summary>Builds the backend of one vcpu; chosen per VM (config <c>lapic = emulated|assisted</c>).</summary>
public delegate ILapicBackend LapicBackendFactory(int vcpuId, ILapicEvents events, IDeviceClock clock);

public static class LapicBackends
{
    /// <summary>Emulated local APICs: APIC ID = vcpu id, vcpu 0 is the BSP.</summary>
    public static LapicBackendFactory Emulated(LapicOptions? options = null) =>
        (vcpuId, events, clock) => new EmulatedLapicBackend(
            new LocalApic((uint)vcpuId, events, clock, options, bsp: vcpuId == 0));

    /// <summary>Local APICs in the kernel (KVM split irqchip), reached through <paramref name="bus"/>.</summary>
    public static LapicBackendFactory KvmAssisted(IKernelApicBus bus) =>
        (vcpuId, events, _) => new KvmAssistedLapicBackend(vcpuId, bus, events);
}

/// <summary>The software path: every verb is the <see cref="LocalApic"/> model's.</summary>
public sealed class EmulatedLapicBackend(LocalApic apic) : ILapicBackend
{
    public LocalApic Model { get; } = apic;

    public LapicBackendKind Kind => LapicBackendKind.Emulated;

    public TimeSpan? NextDeadline => Model.NextDeadline;

    public void OnDeadline() => Model.OnDeadline();

    public ulong ReadMmio(ulong offset, int size) => Model.ReadMmio(offset, size);

    public void WriteMmio(ulong offset, int size, ulong value) => Model.WriteMmio(offset, size, value);

    public bool ReadMsr(uint msr, out ulong value) => Model.ReadMsr(msr, out value);

    public bool WriteMsr(uint msr, ulong value) => Model.WriteMsr(msr, value);

    public bool Matches(DestinationMode mode, uint destination) =>
        mode == DestinationMode.Logical ? Model.MatchesLogical(destination) : Model.MatchesPhysical(destination);

    public void Deliver(DeliveryMode mode, byte vector, bool level, TriggerMode trigger) =>
        Model.Deliver(mode, vector, level, trigger);

    /// <summary>EOI always retires the highest vector in service; a report naming another is stale and ignored.</summary>
    public void Eoi(byte vector)
    {
        if (Model.InServiceVector == vector) Model.EndOfInterrupt();
    }

    public int? PendingInterrupt() => Model.PendingInterrupt();

    public byte? TaskPriority => Model.TaskPriority;

    public ulong? ApicBase => Model.ApicBase;

    public bool AcceptsInterrupts => Model.Mode != ApicMode.Disabled && Model.SoftwareEnabled;

    public void SetTaskPriority(byte tpr) => Model.TaskPriority = tpr;

    public void InterruptAccepted(byte vector) => Model.InterruptAccepted(vector);

    public IInterruptLine Lint(int pin) => pin == 0 ? Model.Lint0 : Model.Lint1;

    public LapicState State() => Model.State();

    public void Restore(LapicState state) => Model.Restore(state);
}
