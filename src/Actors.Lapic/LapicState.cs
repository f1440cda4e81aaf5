using System.Collections.Immutable;

namespace ActorVmm.Lapic;

/// <summary>
/// Snapshot of a <see cref="LocalApic"/>: a copy of its 4 KiB Apic Page (the Current Count register
/// filled in with the value a guest would read at snapshot time), IA32_APIC_BASE, and what the
/// page cannot hold. Timer times are in the model's clock: restore into a clock that continues
/// the same timeline (the VM's clock is part of the VM's snapshot). Equality compares the page by content.
/// </summary>
public sealed record LapicState(
    ImmutableArray<byte> ApicPage,
    uint ApicId,
    ulong ApicBase,
    /// <summary>Errors detected since the last ESR write, not yet readable (SDM §10.5.3).</summary>
    uint EsrPending,
    /// <summary>One-shot / periodic count-down in progress.</summary>
    bool TimerArmed,
    TimeSpan TimerStart,
    /// <summary>Counts already elapsed (in the current period) at <see cref="TimerStart"/>.</summary>
    long TimerCountOffset,
    /// <summary>Periodic: periods completed since <see cref="TimerStart"/>.</summary>
    long TimerPeriods,
    /// <summary>IA32_TSC_DEADLINE; 0 = disarmed.</summary>
    ulong TscDeadline,
    bool Lint0Level,
    bool Lint1Level)
{
    public bool Equals(LapicState? other) =>
        other is not null
        && ApicPage.AsSpan().SequenceEqual(other.ApicPage.AsSpan())
        && ApicId == other.ApicId && ApicBase == other.ApicBase && EsrPending == other.EsrPending
        && TimerArmed == other.TimerArmed && TimerStart == other.TimerStart
        && TimerCountOffset == other.TimerCountOffset && TimerPeriods == other.TimerPeriods
        && TscDeadline == other.TscDeadline && Lint0Level == other.Lint0Level && Lint1Level == other.Lint1Level;

    public override int GetHashCode() =>
        HashCode.Combine(ApicId, ApicBase, EsrPending, TimerArmed, TimerStart, TscDeadline, ApicPage.Length);
}
