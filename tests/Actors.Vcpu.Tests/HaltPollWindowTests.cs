using Xunit;

namespace ActorVmm.Vcpu.Tests;

public sealed class HaltPollWindowTests
{
    [Fact]
    public void It_starts_closed_and_opens_from_a_tenth_of_the_limit_while_wake_ups_come_just_after_it()
    {
        var w = new HaltPollWindow(1000);
        Assert.Equal(0, w.Ticks);
        w.Woken(300); // missed, within the limit: grow
        Assert.Equal(100, w.Ticks);
        w.Woken(300);
        Assert.Equal(200, w.Ticks);
        w.Woken(300);
        Assert.Equal(400, w.Ticks);
        w.Woken(300); // caught: kept
        Assert.Equal(400, w.Ticks);
        w.Woken(900);
        Assert.Equal(800, w.Ticks);
        w.Woken(1000);
        Assert.Equal(1000, w.Ticks); // never past the limit
    }

    [Fact]
    public void An_idle_guest_halves_the_window_and_then_closes_it()
    {
        var w = new HaltPollWindow(1000);
        for (var i = 0; i < 4; i++) w.Woken(999);
        Assert.Equal(800, w.Ticks);
        w.Woken(50_000);
        Assert.Equal(400, w.Ticks);
        w.Woken(50_000);
        Assert.Equal(200, w.Ticks);
        w.Woken(50_000);
        Assert.Equal(100, w.Ticks);
        w.Woken(50_000); // a tenth: one more halving
        Assert.Equal(50, w.Ticks);
        w.Woken(50_000); // below a tenth: closed
        Assert.Equal(0, w.Ticks);
    }

    [Fact]
    public void A_limit_of_zero_never_polls()
    {
        var w = new HaltPollWindow(0);
        foreach (var halted in new long[] { 0, 1, 10, 1_000_000 }) w.Woken(halted);
        Assert.Equal(0, w.Ticks);
    }
}

public sealed class VcpuMailboxWakeTimeTests
{
    [Fact]
    public void A_wake_up_is_timed_when_it_arrives_and_a_plain_reply_is_not()
    {
        var queue = new VcpuMessageQueue(Akka.Actor.ActorRefs.Nobody);
        Assert.Equal(0, queue.LastUrgentTicks);

        queue.Enqueue(Akka.Actor.ActorRefs.Nobody, new Akka.Actor.Envelope(new Devices.DeviceProtocol.WriteCredit(1), Akka.Actor.ActorRefs.NoSender));
        Assert.Equal(0, queue.LastUrgentTicks); // a device's credit wakes nobody

        var before = System.Diagnostics.Stopwatch.GetTimestamp();
        queue.Enqueue(Akka.Actor.ActorRefs.Nobody, new Akka.Actor.Envelope(new Lapic.VlapicProtocol.InterruptPending(0, 0x41), Akka.Actor.ActorRefs.NoSender));
        var after = System.Diagnostics.Stopwatch.GetTimestamp();
        Assert.InRange(queue.LastUrgentTicks, before, after);
        Assert.Equal(2, queue.Count);
    }
}
