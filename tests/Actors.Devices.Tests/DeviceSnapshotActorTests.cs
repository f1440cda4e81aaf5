using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using static ActorVmm.Devices.DeviceProtocol;

namespace ActorVmm.Devices.Tests;

/// <summary>Virtual device time that starts at <paramref name="start"/>: a restored VM's clock,
/// continuing from the Now its snapshot was taken at.</summary>
internal sealed class VirtualClockFrom(IScheduler scheduler, TimeSpan start) : IDeviceClock
{
    private readonly DateTimeOffset _origin = scheduler.Now;
    public TimeSpan Now => start + (scheduler.Now - _origin);
}

/// <summary>Device actors in a snapshot: asked for their state, and started from a saved one.</summary>
public sealed class DeviceSnapshotActorTests : TestKit
{
    private const string VirtualTime = "akka.scheduler.implementation = \"Akka.TestKit.TestScheduler, Akka.TestKit\"";
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    public DeviceSnapshotActorTests() : base(VirtualTime) { }

    private TestScheduler Scheduler => (TestScheduler)Sys.Scheduler;

    /// <summary>A round trip that is no bus access: once answered, the actor has handled everything before it.</summary>
    private async Task<Stats> Sync(IActorRef device)
    {
        device.Tell(GetStats.Instance, TestActor);
        return await ExpectMsgAsync<Stats>();
    }

    private async Task<StateReply> StateOf(IActorRef device, long id)
    {
        device.Tell(new GetState(id), TestActor);
        return await ExpectMsgAsync<StateReply>();
    }

    [Fact]
    public async Task Device_must_answer_its_state_after_everything_sent_before()
    {
        var uart = Sys.ActorOf(DeviceProtocol.Props("uart0", _ => new Uart16550(NullInterruptLine.Instance, _ => { }), ActorRefs.Nobody));
        uart.Tell(new Write(2, 1, 0x01), TestActor); // FIFOs on; posted writes: no answer
        uart.Tell(new Write(7, 1, 0x42), TestActor);
        uart.Tell(new HostInput("ab"u8.ToArray()), TestActor);

        var reply = await StateOf(uart, 17);

        Assert.Equal(17, reply.Id);
        Assert.Equal("uart0", reply.Device);
        Assert.Null(reply.Error);
        var state = Assert.IsType<UartState>(reply.State);
        Assert.Equal(0x42, state.Scr);
        Assert.Equal("ab"u8.ToArray(), state.RxFifo.ToArray());
    }

    [Fact]
    public async Task Device_without_state_must_answer_null()
    {
        var exit = Sys.ActorOf(DeviceProtocol.Props("debug-exit", events => new DebugExit(events), ActorRefs.Nobody));

        Assert.Equal(new StateReply(3, "debug-exit", null), await StateOf(exit, 3));
    }

    /// <summary>A model that cannot save its state (a model bug).</summary>
    private sealed class UnsavableDevice : IStatefulDevice
    {
        public ulong Read(ulong offset, int size) => 0;
        public void Write(ulong offset, int size, ulong value) { }
        public object SaveState() => throw new InvalidOperationException("model bug");
    }

    [Fact]
    public async Task Device_must_answer_even_when_its_model_cannot_save_its_state()
    {
        var device = Sys.ActorOf(DeviceProtocol.Props("broken", _ => new UnsavableDevice(), ActorRefs.Nobody));

        var reply = await StateOf(device, 5);

        Assert.Null(reply.State);
        Assert.Equal("broken could not save its state: model bug", reply.Error);
    }

    [Fact]
    public void Device_given_an_initial_state_without_a_way_to_restore_it_must_be_refused()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            DeviceProtocol.Props("i8042", events => new I8042(events), null, ActorRefs.Nobody, initialState: new I8042(null!).State()));
        Assert.Contains("i8042", e.Message);
    }

    [Fact]
    public async Task Device_given_an_initial_state_must_start_from_it_not_from_power_on()
    {
        var built = 0;
        var saved = new I8042State(0x45, 0xCF, 0x55, true, 0, true);
        var kbc = Sys.ActorOf(DeviceProtocol.Props("i8042",
            events =>
            {
                built++;
                return new I8042(events);
            },
            (events, state) => I8042.FromState((I8042State)state, events), ActorRefs.Nobody, initialState: saved));

        kbc.Tell(new Read(1, I8042.CommandOffset, 1), TestActor);
        Assert.Equal(new ReadResult(1, 0x1D), await ExpectMsgAsync<ReadResult>()); // output full, system flag, command last, unlocked
        kbc.Tell(new Read(2, I8042.DataOffset, 1), TestActor);
        Assert.Equal(new ReadResult(2, 0x55), await ExpectMsgAsync<ReadResult>());
        Assert.Equal(0, built);
        kbc.Tell(GetHealth.Instance, TestActor);
        Assert.Equal(new Health("i8042", 0, 0), await ExpectMsgAsync<Health>()); // a start from a snapshot is no restart

        // A later crash restarts it from its own last state, not from the initial one.
        kbc.Tell(new FaultProtocol.Crash("test"), TestActor);
        Assert.Equal(saved with { OutputBufferFull = false }, (await StateOf(kbc, 3)).State);
        kbc.Tell(GetHealth.Instance, TestActor);
        Assert.Equal(new Health("i8042", 1, 1), await ExpectMsgAsync<Health>());
        Assert.Equal(0, built);
    }

    [Fact]
    public async Task Timed_device_restored_from_a_snapshot_must_keep_pulsing_on_the_clock_that_continues()
    {
        var line = CreateTestProbe();
        var clock = new VirtualClock(Sys.Scheduler);
        var pit = Sys.ActorOf(TimedDeviceProtocol.Props("pit", clock, _ => new Pit8254(clock, new ProbeLine(line.Ref)), ActorRefs.Nobody));
        pit.Tell(new Write(3, 1, 0x34), TestActor); // counter 0, lobyte/hibyte, mode 2
        pit.Tell(new Write(0, 1, 0x9C), TestActor); // 11932 clocks: 10.0001 ms
        pit.Tell(new Write(0, 1, 0x2E), TestActor);
        for (var period = 0; period < 2; period++)
        {
            await Sync(pit); // the timer is armed before the Advance
            Scheduler.Advance(TimeSpan.FromMilliseconds(10.1));
            Assert.Equal(LineEvent.Pulsed, await line.ExpectMsgAsync<LineEvent>());
        }
        await Sync(pit);
        Scheduler.Advance(TimeSpan.FromMilliseconds(5.8)); // 6 ms into the third period
        var reply = await StateOf(pit, 1);
        var savedAt = clock.Now;
        Watch(pit);
        Sys.Stop(pit);
        await ExpectTerminatedAsync(pit);
        var json = DeviceStateCodec.Encode(reply.State!);

        // The restored VM: a new clock continuing from the saved Now, a new line, the decoded state.
        var restoredLine = CreateTestProbe();
        var restoredClock = new VirtualClockFrom(Sys.Scheduler, savedAt);
        var restored = Sys.ActorOf(TimedDeviceProtocol.Props("pit", restoredClock,
            _ => throw new InvalidOperationException("a restored device must not be built from power-on"),
            (_, state) => Pit8254.FromState((PitState)state, restoredClock, new ProbeLine(restoredLine.Ref)),
            ActorRefs.Nobody, initialState: DeviceStateCodec.Decode(json)));
        Assert.Equal(LineEvent.Deasserted, await restoredLine.ExpectMsgAsync<LineEvent>()); // FromState drives the line to its level

        await Sync(restored);
        Scheduler.Advance(TimeSpan.FromMilliseconds(3.9)); // not yet: the third period ends 4.0 ms after the save
        await restoredLine.ExpectNoMsgAsync(Quiet);
        Scheduler.Advance(TimeSpan.FromMilliseconds(0.2));
        Assert.Equal(LineEvent.Pulsed, await restoredLine.ExpectMsgAsync<LineEvent>());
        await Sync(restored);
        Scheduler.Advance(TimeSpan.FromMilliseconds(10));
        Assert.Equal(LineEvent.Pulsed, await restoredLine.ExpectMsgAsync<LineEvent>());
        Assert.Equal(new Stats("pit", 0, 0), await Sync(restored)); // without any bus access
    }

    [Fact]
    public void MonotonicClock_starting_at_a_saved_now_continues_from_it()
    {
        var saved = TimeSpan.FromHours(5);
        var clock = MonotonicClock.StartingAt(saved);

        var first = clock.Now;
        Thread.Sleep(5);
        var second = clock.Now;

        Assert.InRange(first, saved, saved + TimeSpan.FromMinutes(1));
        Assert.True(second > first, $"{second} after {first}");
        Assert.InRange(new MonotonicClock().Now, TimeSpan.Zero, TimeSpan.FromMinutes(1));
        Assert.Throws<ArgumentOutOfRangeException>(() => MonotonicClock.StartingAt(TimeSpan.FromTicks(-1)));
    }
}
