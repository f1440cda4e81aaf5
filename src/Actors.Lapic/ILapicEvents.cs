namespace ActorVmm.Lapic;

/// <summary>
/// Where a <see cref="LocalApic"/> sends what leaves it. Called synchronously from inside the
/// model's methods: implementations must be cheap and must not call back into the model.
/// </summary>
public interface ILapicEvents
{
    /// <summary>An IPI written to the ICR for other APICs (or all of them). The router matches
    /// destinations with <see cref="LocalApic.MatchesPhysical"/> / <see cref="LocalApic.MatchesLogical"/>.</summary>
    void SendIpi(Ipi ipi);

    /// <summary>EOI of a vector whose TMR bit was set (a level-triggered interrupt): the IOAPIC
    /// clears Remote IRR of the entries with this vector (the seed's vioapic_process_eoi).</summary>
    void LevelEoi(byte vector);

    /// <summary>An event for this APIC's vcpu that is not an IRR delivery (NMI, SMI, INIT, SIPI,
    /// ExtINT), from a received message or a local LVT entry. <paramref name="vector"/> is the
    /// SIPI vector for <see cref="VcpuEventKind.StartUp"/>, 0 otherwise. For INIT the model has
    /// already reset itself (SDM §10.4.7.3); the vcpu enters wait-for-SIPI (an AP) or resets.</summary>
    void VcpuEvent(VcpuEventKind kind, byte vector);
}

/// <summary>Drops everything: an APIC with no neighbours.</summary>
public sealed class NullLapicEvents : ILapicEvents
{
    public static readonly NullLapicEvents Instance = new();
    public void SendIpi(Ipi ipi) { }
    public void LevelEoi(byte vector) { }
    public void VcpuEvent(VcpuEventKind kind, byte vector) { }
}
