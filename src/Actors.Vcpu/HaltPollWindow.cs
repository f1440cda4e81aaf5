namespace ActorVmm.Vcpu;

/// <summary>
/// How long a halted vcpu looks for its wake-up before its thread may sleep (KVM's halt_poll_ns,
/// grown and shrunk the same way), in Stopwatch ticks, at most <see cref="Max"/>:
/// a halt that outlasted the window but not the limit would have been caught by a longer one, so
/// the window doubles (starting from a tenth of the limit); a halt longer than the limit halves it,
/// to 0 below a tenth (an idle guest soon stops costing a spinning thread); a halt the window
/// caught keeps it.
/// </summary>
public sealed class HaltPollWindow(long max)
{
    public long Max { get; } = Math.Max(0, max);

    /// <summary>The window now; 0 = no polling.</summary>
    public long Ticks { get; private set; }

    /// <summary>The guest was halted for <paramref name="haltedTicks"/> before its wake-up.</summary>
    public void Woken(long haltedTicks)
    {
        if (haltedTicks <= Ticks) return;
        if (haltedTicks > Max) Ticks = Ticks < Max / 10 ? 0 : Ticks / 2;
        else Ticks = Math.Min(Max, Math.Max(Math.Max(1, Max / 10), Ticks * 2));
    }
}
