using System.Diagnostics;

namespace ActorVmm.Vcpu;

/// <summary>
/// A halt the vcpu handles itself (an emulated local APIC: HLT exits to user space): when it began,
/// whether the VM was told of it (<see cref="VcpuProtocol.VcpuHalted"/>, IF=0), and the poll for its
/// wake-up (KVM's halt_poll_ns): a guest that sleeps in HLT is often woken within microseconds (an
/// IPI answered, a device's reply), and a thread that looks at its mailbox for that long handles
/// the wake-up at once instead of through a sleep and a wake of the thread, which cost more than
/// the wait on a VM host. The window adapts like KVM's (<see cref="HaltPollWindow"/>).
/// Owned by the vcpu's thread.
/// </summary>
internal sealed class HaltPolling(long maxTicks)
{
    private readonly HaltPollWindow _window = new(maxTicks);
    private long _haltedAt;
    private bool _reported;

    /// <summary>A halt began and its end was not seen yet.</summary>
    public bool Pending => _haltedAt != 0 || _reported;

    /// <summary>The window now, in Stopwatch ticks (0: no polling).</summary>
    public long WindowTicks => _window.Ticks;

    /// <summary>The guest halted at <paramref name="now"/> (Stopwatch ticks); <paramref name="reported"/>:
    /// the VM was told this halt may be the vcpu's last.</summary>
    public void Halted(long now, bool reported)
    {
        _haltedAt = now;
        _reported = reported;
    }

    /// <summary>Looks at <paramref name="queue"/> until a message is in or the window has passed
    /// since the halt. Not for a halt the VM was told of (IF=0): no interrupt wakes that one soon.</summary>
    public void Poll(VcpuMessageQueue queue)
    {
        if (_reported || _window.Ticks <= 0) return;
        MailboxSpin.Until(queue, _haltedAt + _window.Ticks);
    }

    /// <summary>
    /// The vcpu runs again at <paramref name="now"/>; <paramref name="wokenAt"/> is when the wake-up
    /// was sent (the mailbox's last urgent arrival). The window learns how long the halt lasted:
    /// until the wake-up was sent, not until a thread that slept through it got to it (counting that
    /// delay would shrink the window because it missed, and it would miss again). True when the VM
    /// was told of the halt and must now be told the vcpu woke.
    /// </summary>
    public bool Woken(long now, long wokenAt)
    {
        if (_haltedAt != 0)
        {
            _window.Woken((wokenAt > _haltedAt && wokenAt <= now ? wokenAt : now) - _haltedAt);
            _haltedAt = 0;
        }
        var reported = _reported;
        _reported = false;
        return reported;
    }
}

/// <summary>Waiting for a vcpu's next message by looking at its mailbox.</summary>
internal static class MailboxSpin
{
    /// <summary>
    /// Looks at <paramref name="queue"/> until a message is in or <paramref name="until"/> (Stopwatch
    /// ticks) has passed. Every other turn offers the core to another thread (sched_yield returns at
    /// once when none wants it, as KVM stops polling when its CPU has other work): on a host with few
    /// cores the thread that will send the message (a device on the pool, another vcpu) may be
    /// waiting for this one's core.
    /// </summary>
    public static void Until(VcpuMessageQueue queue, long until)
    {
        for (var turn = 0; !queue.HasMessages && Stopwatch.GetTimestamp() < until; turn++)
        {
            if ((turn & 1) == 0) Thread.SpinWait(20);
            else Thread.Yield();
        }
    }
}
