using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using static ActorVmm.Lapic.ApicOffsets;
using static ActorVmm.Lapic.VlapicProtocol;

namespace ActorVmm.Lapic.Tests;

/// <summary>
/// An emulated local APIC's snapshot: <see cref="LapicState"/> through JSON, and a vlapic actor built
/// from one (<see cref="VlapicProtocol.Props"/> with an initial state) on TestKit's virtual scheduler.
/// </summary>
public sealed class VlapicSnapshotTests : TestKit
{
    private const string VirtualTime = """akka.scheduler.implementation = "Akka.TestKit.TestScheduler, Akka.TestKit" """;
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    /// <summary>The snapshot file's options: camelCase, enums as strings.</summary>
    private static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web) { Converters = { new JsonStringEnumConverter() } };

    public VlapicSnapshotTests() : base(VirtualTime)
    {
    }

    private TestScheduler Scheduler => (TestScheduler)Sys.Scheduler;

    [Fact]
    public void LapicState_must_round_trip_through_json_and_restore_a_model_that_behaves_the_same()
    {
        var rig = new Rig();
        rig.Write(Tpr, 0x20);
        rig.Apic.Deliver(DeliveryMode.Fixed, 0x42, true, TriggerMode.Edge);
        rig.Apic.InterruptAccepted(0x42);                         // in service
        rig.Apic.Deliver(DeliveryMode.Fixed, 0x52, true, TriggerMode.Level); // requested, level (TMR)
        rig.Write(TimerDivide, 0b1011);
        rig.Write(LvtTimer, (1u << 17) | 0x61);                    // periodic
        rig.Write(TimerInitialCount, 1000);
        rig.Clock.Advance(TimeSpan.FromTicks(2500));               // two periods and a half
        var state = rig.Apic.State();

        var json = JsonSerializer.Serialize(state, Json);
        var back = JsonSerializer.Deserialize<LapicState>(json, Json)!;

        Assert.Equal(state, back);
        var restored = new Rig(enabled: false);
        restored.Clock.Advance(TimeSpan.FromTicks(2500)); // the same clock time
        restored.Apic.Restore(back);
        Assert.Equal(rig.Apic.PendingInterrupt(), restored.Apic.PendingInterrupt());
        Assert.Equal(rig.Apic.NextDeadline, restored.Apic.NextDeadline);
        Assert.Equal(rig.Read(TimerCurrentCount), restored.Read(TimerCurrentCount));
        Assert.Equal(rig.Read(Isr + 0x40), restored.Read(Isr + 0x40));
        Assert.Equal(rig.Read(Tmr + 0x50), restored.Read(Tmr + 0x50));
    }

    /// <summary>
    /// A vlapic built from a saved state with a vector requested (IRR), a raised TPR, a moved APIC
    /// base and an armed one-shot timer tells nothing while it has no vcpu, then tells the vcpu it is
    /// attached to all three, and its timer fires at the saved deadline on the same clock.
    /// </summary>
    [Fact]
    public async Task Vlapic_built_from_a_state_must_offer_its_vcpu_what_it_holds_once_attached_and_fire_its_armed_timer()
    {
        // The state, as a running vlapic gives it; both vlapics on one clock (the VM's, continued).
        var clock = new SchedulerClock(Sys.Scheduler);
        var source = CreateTestProbe();
        var bus = CreateTestProbe();
        var first = Sys.ActorOf(Props(0, new Wiring(source, CreateTestProbe(), CreateTestProbe()), clock: clock), "first");
        void Write(int offset, uint value) => first.Tell(new DeviceProtocol.Write((ulong)offset, 4, value), bus);
        Write(Svr, 0x1FF);
        Write(Tpr, 0x20);
        first.Tell(new SetApicBase(1, 0xFED0_0900), bus);
        await bus.ExpectMsgAsync<MsrWriteResult>();
        first.Tell(new DeliverInterrupt(0x52, true, TriggerMode.Edge, DeliveryMode.Fixed));
        Write(TimerDivide, 0b1011);
        Write(LvtTimer, 0x61);
        Write(TimerInitialCount, 1_000_000);                       // 1 ms at the default 1 GHz
        first.Tell(GetStats.Instance);                             // the writes are handled (mailbox order):
        await ExpectMsgAsync<Stats>();                             // the timer started at 0 on the clock
        Scheduler.Advance(TimeSpan.FromMilliseconds(0.25));
        first.Tell(GetState.Instance);
        var state = (await ExpectMsgAsync<StateReply>()).State;
        first.Tell(PoisonPill.Instance);
        Assert.True(state.TimerArmed);

        var vcpu = CreateTestProbe();
        var restored = Sys.ActorOf(Props(0, new Wiring(ActorRefs.Nobody, CreateTestProbe(), CreateTestProbe()), clock: clock,
            initial: JsonSerializer.Deserialize<LapicState>(JsonSerializer.Serialize(state, Json), Json)), "restored");
        restored.Tell(GetStats.Instance);
        await ExpectMsgAsync<Stats>();
        await vcpu.ExpectNoMsgAsync(TimeSpan.Zero);

        restored.Tell(new AttachVcpu(vcpu));
        Assert.Equal(0x52, (await vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
        Assert.Equal(new TaskPriorityChanged(0, 0x20), await vcpu.ExpectMsgAsync<TaskPriorityChanged>());
        Assert.Equal(new ApicBaseChanged(0, 0xFED0_0900), await vcpu.ExpectMsgAsync<ApicBaseChanged>());
        await vcpu.ExpectNoMsgAsync(Quiet);

        Scheduler.Advance(TimeSpan.FromMilliseconds(0.7));        // before the deadline
        await vcpu.ExpectNoMsgAsync(Quiet);
        Scheduler.Advance(TimeSpan.FromMilliseconds(0.1));        // past it
        Assert.Equal(0x61, (await vcpu.ExpectMsgAsync<InterruptPending>()).Vector);
    }

    [Fact]
    public async Task Vlapic_without_a_saved_state_must_tell_a_newly_attached_vcpu_nothing()
    {
        var vcpu = CreateTestProbe();
        var vlapic = Sys.ActorOf(Props(0, new Wiring(ActorRefs.Nobody, CreateTestProbe(), CreateTestProbe())), "fresh");
        vlapic.Tell(new AttachVcpu(vcpu));
        await vcpu.ExpectNoMsgAsync(Quiet);
    }
}
