using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using static ActorVmm.Devices.DeviceProtocol;

namespace ActorVmm.Devices.Tests;

/// <summary>What a <see cref="ProbeLine"/> was told.</summary>
internal sealed record LineEvent(string Kind)
{
    public static readonly LineEvent Asserted = new("assert");
    public static readonly LineEvent Deasserted = new("deassert");
    public static readonly LineEvent Pulsed = new("pulse");
}

/// <summary>An interrupt line that reports to a probe, standing in for the PIC/IOAPIC actor.</summary>
internal sealed class ProbeLine(IActorRef probe) : IInterruptLine
{
    public void Assert() => probe.Tell(LineEvent.Asserted);
    public void Deassert() => probe.Tell(LineEvent.Deasserted);
    public void Pulse() => probe.Tell(LineEvent.Pulsed);
}

/// <summary>Device time that is the TestScheduler's virtual time.</summary>
internal sealed class VirtualClock(IScheduler scheduler) : IDeviceClock
{
    private readonly DateTimeOffset _origin = scheduler.Now;
    public TimeSpan Now => scheduler.Now - _origin;
}

public sealed class TimedDeviceActorTests : TestKit
{
    private const string VirtualTime = "akka.scheduler.implementation = \"Akka.TestKit.TestScheduler, Akka.TestKit\"";
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    public TimedDeviceActorTests() : base(VirtualTime) { }

    private TestScheduler Scheduler => (TestScheduler)Sys.Scheduler;

    /// <summary>A round trip that is no bus access: once answered, the actor has handled everything before it.</summary>
    private async Task<Stats> Sync(IActorRef device)
    {
        device.Tell(GetStats.Instance, TestActor);
        return await ExpectMsgAsync<Stats>();
    }

    private IActorRef Pit(TestProbe line)
    {
        var clock = new VirtualClock(Sys.Scheduler);
        return Sys.ActorOf(TimedDeviceProtocol.Props("pit", clock, _ => new Pit8254(clock, new ProbeLine(line.Ref)), ActorRefs.Nobody));
    }

    [Fact]
    public async Task TimedDevice_must_pulse_irq0_every_pit_period_without_any_bus_access()
    {
        var line = CreateTestProbe();
        var pit = Pit(line);
        pit.Tell(new Write(3, 1, 0x34), TestActor); // counter 0, lobyte/hibyte, mode 2
        pit.Tell(new Write(0, 1, 1193 & 0xFF), TestActor); // 1193 clocks: just under 1 ms
        pit.Tell(new Write(0, 1, 1193 >> 8), TestActor);
        await Sync(pit);

        for (var i = 0; i < 3; i++)
        {
            Scheduler.Advance(TimeSpan.FromMilliseconds(1));
            Assert.Equal(LineEvent.Pulsed, await line.ExpectMsgAsync<LineEvent>());
            await Sync(pit); // the timer is re-armed before the next Advance
        }

        await line.ExpectNoMsgAsync(Quiet);
        Assert.Equal(new Stats("pit", 0, 3), await Sync(pit));
    }

    [Fact]
    public async Task TimedDevice_must_not_fire_before_the_deadline()
    {
        var line = CreateTestProbe();
        var pit = Pit(line);
        pit.Tell(new Write(3, 1, 0x34), TestActor);
        pit.Tell(new Write(0, 1, 0x9C), TestActor); // 11932 clocks: 10.0001 ms
        pit.Tell(new Write(0, 1, 0x2E), TestActor);
        await Sync(pit);

        Scheduler.Advance(TimeSpan.FromMilliseconds(10));
        await line.ExpectNoMsgAsync(Quiet);

        Scheduler.Advance(TimeSpan.FromMicroseconds(1));
        Assert.Equal(LineEvent.Pulsed, await line.ExpectMsgAsync<LineEvent>());
    }

    [Fact]
    public async Task TimedDevice_must_raise_rtc_update_interrupts_again_after_the_guest_reads_register_c()
    {
        var line = CreateTestProbe();
        var clock = new VirtualClock(Sys.Scheduler);
        var wall = new DateTime(2024, 3, 5, 13, 45, 30).AddMilliseconds(500);
        var rtc = Sys.ActorOf(TimedDeviceProtocol.Props("rtc", clock, _ => new CmosRtc(() => wall, clock, new ProbeLine(line.Ref)), ActorRefs.Nobody));
        rtc.Tell(new Write(0, 1, 0x0B), TestActor);
        rtc.Tell(new Write(1, 1, 0x12), TestActor); // UIE, 24-hour
        await Sync(rtc);

        Scheduler.Advance(TimeSpan.FromMilliseconds(500));
        Assert.Equal(LineEvent.Asserted, await line.ExpectMsgAsync<LineEvent>());

        rtc.Tell(new Write(0, 1, 0x0C), TestActor);
        rtc.Tell(new Read(7, 1, 1), TestActor);
        Assert.Equal(new ReadResult(7, 0xD0), await ExpectMsgAsync<ReadResult>()); // IRQF, UF, and PF (set at 1024 Hz without PIE)
        Assert.Equal(LineEvent.Deasserted, await line.ExpectMsgAsync<LineEvent>());
        await Sync(rtc); // the timer is re-armed before the Advance (the line may change before it is)

        Scheduler.Advance(TimeSpan.FromSeconds(1));
        Assert.Equal(LineEvent.Asserted, await line.ExpectMsgAsync<LineEvent>());
    }

    [Fact]
    public async Task TimedDevice_must_keep_pulsing_after_a_crash_restores_the_pit_from_its_state()
    {
        var line = CreateTestProbe();
        var clock = new VirtualClock(Sys.Scheduler);
        var pit = Sys.ActorOf(TimedDeviceProtocol.Props("pit", clock,
            _ => new Pit8254(clock, new ProbeLine(line.Ref)),
            (_, state) => Pit8254.FromState((PitState)state, clock, new ProbeLine(line.Ref)),
            ActorRefs.Nobody));
        pit.Tell(new Write(3, 1, 0x34), TestActor);
        pit.Tell(new Write(0, 1, 1193 & 0xFF), TestActor);
        pit.Tell(new Write(0, 1, 1193 >> 8), TestActor);
        await Sync(pit);

        pit.Tell(new FaultProtocol.Crash("test"), TestActor);
        Assert.Equal(new WriteCredit(3), await ExpectMsgAsync<WriteCredit>()); // a restart returns the uncredited writes
        Assert.Equal(LineEvent.Deasserted, await line.ExpectMsgAsync<LineEvent>()); // FromState drives the line to its level
        pit.Tell(GetHealth.Instance, TestActor);
        Assert.Equal(new Health("pit", 1, 1), await ExpectMsgAsync<Health>());

        Scheduler.Advance(TimeSpan.FromMilliseconds(1));
        Assert.Equal(LineEvent.Pulsed, await line.ExpectMsgAsync<LineEvent>());
    }

    [Fact]
    public async Task TimedDevice_must_credit_posted_writes_and_mask_reads_like_any_device()
    {
        var pit = Pit(CreateTestProbe());

        for (var i = 0; i < CreditBatch; i++) pit.Tell(new Write(3, 1, 0x00), TestActor); // counter latch commands
        Assert.Equal(new WriteCredit(CreditBatch), await ExpectMsgAsync<WriteCredit>());

        pit.Tell(new Read(1, 3, 2), TestActor); // control word: write-only, reads open bus
        Assert.Equal(new ReadResult(1, 0xFF), await ExpectMsgAsync<ReadResult>());
    }
}

/// <summary>The same actor on the real scheduler and the host's monotonic clock.</summary>
public sealed class TimedDeviceActorRealTimeTests : TestKit
{
    [Fact]
    public async Task TimedDevice_must_deliver_pit_interrupts_on_real_timers()
    {
        var line = CreateTestProbe();
        var clock = new MonotonicClock();
        var pit = Sys.ActorOf(TimedDeviceProtocol.Props("pit", clock, _ => new Pit8254(clock, new ProbeLine(line.Ref)), ActorRefs.Nobody));

        pit.Tell(new Write(3, 1, 0x34), TestActor);
        pit.Tell(new Write(0, 1, 1193 & 0xFF), TestActor); // 1 ms
        pit.Tell(new Write(0, 1, 1193 >> 8), TestActor);

        for (var i = 0; i < 3; i++)
            Assert.Equal(LineEvent.Pulsed, await line.ExpectMsgAsync<LineEvent>(TimeSpan.FromSeconds(5)));
    }
}
