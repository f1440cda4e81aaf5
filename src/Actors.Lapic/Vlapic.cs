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
/// A hardware assist for one vcpu's local APIC: the seed's <c>struct vlapic_ops</c>, installed
/// only where the hardware can (bhyve's vmx_vlapic_init). Each member is a hook that
/// <see cref="Vlapic"/> calls after its generic checks in place of the software path. An assist
/// keeps the registers, the timer and the priorities itself, so the vlapic asks it nothing that
/// needs them.
/// </summary>
public interface ILapicAssist
{
    /// <summary>The APIC ID the assist was created with (the vcpu id).</summary>
    uint ApicId { get; }

    /// <summary>An interrupt message routed to this APIC and legal as a message (the hook of
    /// vlapic_set_intr_ready, <c>vlapic_ops.set_intr_ready</c>); what the registers make of it is
    /// the assist's business.</summary>
    void SetIntrReady(DeliveryMode mode, byte vector, bool level, TriggerMode trigger);

    /// <summary>LINT0 (pin 0) and LINT1 (pin 1) of the assisted APIC.</summary>
    IInterruptLine Lint(int pin);
}

/// <summary>
/// One vcpu's local APIC as its VlapicActor drives it: the seed's vlapic. The VM chooses once,
/// when it is built (<see cref="LapicBackendFactory"/>), whether a hardware assist is installed,
/// as bhyve installs vlapic_ops only when the hardware can. Every verb first makes the checks
/// that hold whatever holds the registers (a pin that exists, a message the APIC bus defines, a
/// destination's broadcast ID), then calls the assist's hook if one is installed, else the
/// software path, <see cref="LocalApic"/>, which makes the checks that need the registers
/// (register validity, APIC enabled, x2APIC mode rules) itself.
/// <list type="bullet">
/// <item><b>Emulated</b> (<see cref="Emulated"/>): no assist; every verb is the model's.</item>
/// <item><b>KvmAssisted</b> (<see cref="Assisted"/>, <see cref="KvmAssistedLapicBackend"/>): the kernel's
/// local APIC (KVM_CAP_SPLIT_IRQCHIP). Guest MMIO/MSR accesses never exit to user space (a stray
/// one reads 0 or is a #GP); a delivery is the assist's KVM_SIGNAL_MSI; <see cref="Eoi"/> turns a
/// KVM_EXIT_IOAPIC_EOI into <see cref="ILapicEvents.LevelEoi"/>; <see cref="PendingInterrupt"/>
/// is always null (the kernel injects: no <c>InterruptPending</c>, no kick, the posted-interrupt
/// style); the timer is in the kernel (<see cref="NextDeadline"/> null); the state is
/// KVM_GET_LAPIC's, read by the vcpu between two runs. The VM builder enables the split irqchip
/// before creating vcpus and installs no MSR filter for the APIC MSRs; the IOAPIC's messages go
/// to the kernel as one MSI each through the router (the kernel matches logical destinations and
/// arbitrates lowest priority); IPIs, INIT/SIPI and HLT never leave the kernel.</item>
/// </list>
/// </summary>
public sealed class Vlapic : ITimedDevice
{
    private readonly LocalApic? _model;
    private readonly ILapicAssist? _assist;
    private readonly ILapicEvents _events;

    private Vlapic(LocalApic? model, ILapicAssist? assist, ILapicEvents events)
    {
        _model = model;
        _assist = assist;
        _events = events;
    }

    /// <summary>No assist: every verb after the generic checks is <paramref name="model"/>'s (which
    /// sends its own events).</summary>
    public static Vlapic Emulated(LocalApic model) => new(model, null, NullLapicEvents.Instance);

    /// <summary>The registers are <paramref name="assist"/>'s; <paramref name="events"/> takes what it hands back.</summary>
    public static Vlapic Assisted(ILapicAssist assist, ILapicEvents events) => new(null, assist, events);

    public LapicBackendKind Kind => _assist is null ? LapicBackendKind.Emulated : LapicBackendKind.KvmAssisted;

    /// <summary>The software path; null when an assist holds the registers.</summary>
    public LocalApic? Model => _model;

    /// <summary>The timer's next deadline; an assist's timer is its own.</summary>
    public TimeSpan? NextDeadline => _model?.NextDeadline;

    public void OnDeadline() => _model?.OnDeadline();

    /// <summary>xAPIC MMIO at an offset inside the 4 KiB page. An assist answers the page without
    /// an exit: a stray access reaches nothing and reads 0.</summary>
    public ulong ReadMmio(ulong offset, int size) => _model?.ReadMmio(offset, size) ?? 0;

    public void WriteMmio(ulong offset, int size, ulong value) => _model?.WriteMmio(offset, size, value);

    /// <summary>IA32_APIC_BASE, IA32_TSC_DEADLINE and x2APIC MSRs; false means #GP. An assist owns
    /// the APIC MSRs without an exit: a stray access is a #GP.</summary>
    public bool ReadMsr(uint msr, out ulong value)
    {
        value = 0;
        return _model?.ReadMsr(msr, out value) ?? false;
    }

    public bool WriteMsr(uint msr, ulong value) => _model?.WriteMsr(msr, value) ?? false;

    /// <summary>WRMSR with the guest's TSC at the write (<see cref="LocalApic.WriteMsr(uint, ulong, ulong?)"/>).</summary>
    public bool WriteMsr(uint msr, ulong value, ulong? guestTsc) => _model?.WriteMsr(msr, value, guestTsc) ?? false;

    /// <summary>
    /// Whether a message with this destination (no shorthand) is for this APIC (SDM Vol 3A
    /// §10.6.2). The model matches in its mode. With an assist, which alone knows LDR, DFR and the
    /// mode: a physical destination is this APIC's ID or a broadcast; every logical destination
    /// may be, and the kernel filters the MSI.
    /// </summary>
    public bool Matches(DestinationMode mode, uint destination)
    {
        if (_model is { } model)
            return mode == DestinationMode.Logical ? model.MatchesLogical(destination) : model.MatchesPhysical(destination);
        return mode == DestinationMode.Logical || destination == _assist!.ApicId || IsBroadcast(destination);
    }

    /// <summary>The physical broadcast ID: 0xFF in xAPIC mode, 0xFFFFFFFF in x2APIC mode (§10.6.2.1, §10.12.9).</summary>
    public static bool IsBroadcast(uint destination) => destination is 0xFF or 0xFFFF_FFFF;

    /// <summary>
    /// Delivers an interrupt message routed to this APIC (the seed's lapic_intr_* and
    /// vlapic_set_intr_ready). Generic: a reserved delivery mode (011b) and a level-triggered
    /// de-assert of a fixed, lowest-priority or INIT message do nothing (§10.6.1, Table 10-3;
    /// KVM's APIC ignores them too). Non-IRR kinds come back through <see cref="ILapicEvents.VcpuEvent"/>.
    /// </summary>
    public void Deliver(DeliveryMode mode, byte vector, bool level, TriggerMode trigger)
    {
        if ((byte)mode == 0b011) return;
        if (trigger == TriggerMode.Level && !level && mode is DeliveryMode.Fixed or DeliveryMode.LowestPriority or DeliveryMode.Init)
            return;
        if (_assist is { } assist) assist.SetIntrReady(mode, vector, level, trigger);
        else _model!.Deliver(mode, vector, level, trigger);
    }

    /// <summary>An EOI the vcpu reports without the register page seeing it. With an assist: a
    /// KVM_EXIT_IOAPIC_EOI, the kernel APIC retired a level-triggered vector. Without: the same as
    /// a write to the EOI register when <paramref name="vector"/> is the one in service (EOI
    /// always retires the highest vector in service; a report naming another is stale and ignored).</summary>
    public void Eoi(byte vector)
    {
        if (_model is null) _events.LevelEoi(vector);
        else if (_model.InServiceVector == vector) _model.EndOfInterrupt();
    }

    /// <summary>Highest vector the vcpu should take now, or null (vlapic_pending_intr). With an
    /// assist always null: the kernel injects by itself.</summary>
    public int? PendingInterrupt() => _model?.PendingInterrupt();

    /// <summary>Whether a fixed or lowest-priority interrupt would be taken now (the APIC is enabled
    /// globally and in software, SDM §10.4.7.2): lowest-priority arbitration passes over one that
    /// would not. An assist arbitrates itself: always true.</summary>
    public bool AcceptsInterrupts => _model is not { } model || (model.Mode != ApicMode.Disabled && model.SoftwareEnabled);

    /// <summary>The TPR, which the vcpu mirrors in the guest's CR8; null with an assist (KVM syncs CR8 itself).</summary>
    public byte? TaskPriority => _model?.TaskPriority;

    /// <summary>IA32_APIC_BASE, which the vcpu mirrors: it decodes the xAPIC page where the base
    /// names it, and tells KVM, whose CPUID.01H:EDX.APIC follows its EN bit; null with an assist
    /// (KVM sees the guest's writes itself).</summary>
    public ulong? ApicBase => _model?.ApicBase;

    /// <summary>The guest wrote CR8 (TPR = CR8 &lt;&lt; 4), seen by the vcpu at an exit.</summary>
    public void SetTaskPriority(byte tpr)
    {
        if (_model is { } model) model.TaskPriority = tpr;
    }

    /// <summary>The vcpu injected <paramref name="vector"/> (vlapic_intr_accepted); an assist's
    /// injections are its own.</summary>
    public void InterruptAccepted(byte vector) => _model?.InterruptAccepted(vector);

    /// <summary>LINT0 (pin 0) and LINT1 (pin 1); null for a pin the APIC does not have.</summary>
    public IInterruptLine? Lint(int pin) => pin switch
    {
        0 or 1 when _assist is { } assist => assist.Lint(pin),
        0 => _model!.Lint0,
        1 => _model!.Lint1,
        _ => null,
    };

    /// <summary>The model's state. An assisted APIC's state is read by its vcpu (KVM_GET_LAPIC).</summary>
    public LapicState State() => _model?.State() ??
        throw new InvalidOperationException("the in-kernel local APIC's state is read by its vcpu (KVM_GET_LAPIC)");

    public void Restore(LapicState state)
    {
        if (_model is null)
            throw new InvalidOperationException("the in-kernel local APIC's state is written by its vcpu (KVM_SET_LAPIC)");
        _model.Restore(state);
    }
}

/// <summary>Builds the vlapic of one vcpu; chosen per VM (config <c>lapic = emulated|assisted</c>).</summary>
public delegate Vlapic LapicBackendFactory(int vcpuId, ILapicEvents events, IDeviceClock clock);

public static class LapicBackends
{
    /// <summary>Emulated local APICs: APIC ID = vcpu id, vcpu 0 is the BSP.</summary>
    public static LapicBackendFactory Emulated(LapicOptions? options = null) =>
        (vcpuId, events, clock) => Vlapic.Emulated(new LocalApic((uint)vcpuId, events, clock, options, bsp: vcpuId == 0));

    /// <summary>Local APICs in the kernel (KVM split irqchip), reached through <paramref name="bus"/>.</summary>
    public static LapicBackendFactory KvmAssisted(IKernelApicBus bus) =>
        (vcpuId, events, _) => Vlapic.Assisted(new KvmAssistedLapicBackend(vcpuId, bus, events), events);
}
