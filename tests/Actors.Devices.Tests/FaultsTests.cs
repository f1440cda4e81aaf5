using Akka.Actor;
using Akka.TestKit.Xunit2;

namespace ActorVmm.Devices.Tests;

/// <summary>The shared fault handlers, in an actor with a thread of its own as the vcpu and vmspace use them.</summary>
public sealed class FaultsTests : TestKit
{
    private sealed class ThreadStaller : ReceiveActor
    {
        public ThreadStaller()
        {
            Receive<FaultProtocol.Crash>(Faults.Crash);
            Receive<FaultProtocol.Stall>(s => Faults.StallThread(s, Context, "staller"));
            Receive<string>(s => Sender.Tell(s));
        }
    }

    [Fact]
    public void A_thread_stall_is_announced_holds_what_comes_after_it_and_answers_the_asker()
    {
        Sys.EventStream.Subscribe(TestActor, typeof(FaultProtocol.StallStarted));
        var actor = Sys.ActorOf(Akka.Actor.Props.Create(() => new ThreadStaller()));
        actor.Tell(new FaultProtocol.Stall(TimeSpan.FromMilliseconds(300), "test"));
        actor.Tell("after");

        var started = ExpectMsg<FaultProtocol.StallStarted>();
        Assert.Equal(("test", TimeSpan.FromMilliseconds(300)), (started.Reason, started.Duration));
        Assert.Equal(actor.Path.ToStringWithoutAddress(), started.Actor);
        Assert.Equal("staller stalled for 300 ms", ExpectMsg<FaultProtocol.Injected>().What);
        ExpectMsg("after");
    }

    [Fact]
    public void A_thread_stall_is_clamped_to_the_longest()
    {
        Sys.EventStream.Subscribe(TestActor, typeof(FaultProtocol.StallStarted));
        var actor = Sys.ActorOf(Akka.Actor.Props.Create(() => new ThreadStaller()));
        actor.Tell(new FaultProtocol.Stall(TimeSpan.FromMilliseconds(-5), "negative"));
        Assert.Equal(TimeSpan.Zero, ExpectMsg<FaultProtocol.StallStarted>().Duration);
        Assert.Equal("staller stalled for 0 ms", ExpectMsg<FaultProtocol.Injected>().What);
    }

    [Fact]
    public void A_crash_throws_the_injected_fault_for_the_supervisor()
    {
        var actor = Sys.ActorOf(Akka.Actor.Props.Create(() => new ThreadStaller()));
        EventFilter.Exception<InjectedFaultException>(contains: "injected fault: on purpose")
            .ExpectOne(() => actor.Tell(new FaultProtocol.Crash("on purpose")));
    }
}
