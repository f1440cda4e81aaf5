using System.Collections.Immutable;

namespace ActorVmm.Lapic;

/// <summary>
/// Snapshot of a <see cref="LocalApic"/>: a copy of its 4 KiB Apic Page (the Current Count register
/// filled in with the value a guest would read at snapshot time), IA32_APIC_BASE, and what the
/// page cannot hold. Timer times are in the model's clock: restore into a clock that continues
/// the same timeline (the VM's clock is part of the VM's snapshot). Equality compares the page by content.
/// </summary>
/// <param name="ApicPage">the 4 KiB register page</param>
/// <param name="ApicId">the APIC ID (the page's ID register holds it as the guest reads it)</param>
/// <param name="ApicBase">IA32_APIC_BASE</param>
/// <param name="EsrPending">errors detected since the last ESR write, not yet readable (SDM §10.5.3)</param>
/// <param name="TimerArmed">one-shot / periodic count-down in progress</param>
/// <param name="TimerStart">the clock time the count-down bookkeeping starts from</param>
/// <param name="TimerCountOffset">counts already elapsed (in the current period) at <paramref name="TimerStart"/></param>
/// <param name="TimerPeriods">periodic: periods completed since <paramref name="TimerStart"/></param>
/// <param name="TscDeadline">IA32_TSC_DEADLINE; 0 = disarmed</param>
/// <param name="Lint0Level">the level on the LINT0 pin</param>
/// <param name="Lint1Level">the level on the LINT1 pin</param>
public sealed record LapicState(
    ImmutableArray<byte> ApicPage,
    uint ApicId,
    ulong ApicBase,
    uint EsrPending,
    bool TimerArmed,
    TimeSpan TimerStart,
    long TimerCountOffset,
    long TimerPeriods,
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
