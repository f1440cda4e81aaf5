using System.Text;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Cluster;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>The console hub behind `ctl console`: history, followers, the end, input to the UART.</summary>
public sealed class ConsoleHubTests : Akka.TestKit.Xunit2.TestKit
{
    private static byte[] Bytes(string s) => Encoding.ASCII.GetBytes(s);

    [Fact]
    public void A_client_gets_the_history_then_every_chunk_then_the_end()
    {
        var hub = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        hub.Tell(new ConsoleProtocol.Output(Bytes("one\n")));
        var client = CreateTestProbe();
        hub.Tell(new ConsoleProtocol.Attach(client.Ref, Follow: true));
        var history = client.ExpectMsg<ConsoleProtocol.History>();
        Assert.Equal("one\n", Encoding.ASCII.GetString(history.Bytes));
        Assert.Equal(0, history.Offset);
        Assert.False(history.Ended);

        hub.Tell(new ConsoleProtocol.Output(Bytes("two\n")));
        var chunk = client.ExpectMsg<ConsoleProtocol.Chunk>();
        Assert.Equal("two\n", Encoding.ASCII.GetString(chunk.Bytes));
        Assert.Equal(4, chunk.Offset);

        hub.Tell(new ConsoleProtocol.VmEnded("guest halted (exit code 0)"));
        var end = client.ExpectMsg<ConsoleProtocol.Chunk>();
        Assert.True(end.Ended);
        Assert.Equal("guest halted (exit code 0)", end.Detail);

        // After the end: the history stays, marked ended.
        var late = CreateTestProbe();
        hub.Tell(new ConsoleProtocol.Attach(late.Ref, Follow: true));
        var kept = late.ExpectMsg<ConsoleProtocol.History>();
        Assert.Equal("one\ntwo\n", Encoding.ASCII.GetString(kept.Bytes));
        Assert.True(kept.Ended);
        late.ExpectNoMsg(TimeSpan.FromMilliseconds(200));
    }

    [Fact]
    public void A_hub_whose_vm_moved_passes_the_new_hubs_output_on_from_where_it_stopped_and_then_the_end()
    {
        var old = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        old.Tell(new ConsoleProtocol.Output(Bytes("before\n")));
        var client = CreateTestProbe();
        old.Tell(new ConsoleProtocol.Attach(client.Ref, Follow: true));
        Assert.Equal("before\n", Encoding.ASCII.GetString(client.ExpectMsg<ConsoleProtocol.History>().Bytes));

        // The VM moves: the new hub goes on from the old one's state, and has output of its own before the
        // old one follows it: the client gets each byte once, at its offset.
        old.Tell(ConsoleProtocol.GetState.Instance, TestActor);
        var state = ExpectMsg<ConsoleProtocol.State>();
        Assert.Equal(7, state.Written);
        var moved = Sys.ActorOf(ConsoleProtocol.Props("vm", state));
        moved.Tell(new ConsoleProtocol.Output(Bytes("after\n")));
        old.Tell(new ConsoleProtocol.MovedTo(moved, "127.0.0.1:2"));
        var first = client.ExpectMsg<ConsoleProtocol.Chunk>();
        Assert.Equal(("after\n", 7L), (Encoding.ASCII.GetString(first.Bytes), first.Offset));
        moved.Tell(new ConsoleProtocol.Output(Bytes("more\n")));
        var second = client.ExpectMsg<ConsoleProtocol.Chunk>();
        Assert.Equal(("more\n", 13L), (Encoding.ASCII.GetString(second.Bytes), second.Offset));

        // Input typed at the old hub goes to the VM where it runs now.
        var vmUart = CreateTestProbe();
        moved.Tell(new ConsoleProtocol.Connect(VmWithUart(vmUart.Ref)));
        old.Tell(new ConsoleProtocol.Input(Bytes("typed")));
        Assert.Equal("typed", Encoding.ASCII.GetString(vmUart.ExpectMsg<DeviceProtocol.HostInput>().Data));

        // A client attaching to the new hub sees the whole output; the end reaches the old hub's client, and
        // the old hub, a relay now, stops.
        var late = CreateTestProbe();
        moved.Tell(new ConsoleProtocol.Attach(late.Ref, Follow: false));
        Assert.Equal("before\nafter\nmore\n", Encoding.ASCII.GetString(late.ExpectMsg<ConsoleProtocol.History>().Bytes));
        Watch(old);
        moved.Tell(new ConsoleProtocol.VmEnded("guest halted (exit code 0)"));
        var end = client.ExpectMsg<ConsoleProtocol.Chunk>();
        Assert.True(end.Ended);
        Assert.Equal("guest halted (exit code 0)", end.Detail);
        ExpectTerminated(old);
    }

    [Fact]
    public void A_hub_whose_vm_moved_stops_once_no_client_follows_it()
    {
        var moved = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        var unfollowed = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        Watch(unfollowed);
        unfollowed.Tell(new ConsoleProtocol.MovedTo(moved, "127.0.0.1:2"));
        ExpectTerminated(unfollowed);

        var followed = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        var client = CreateTestProbe();
        followed.Tell(new ConsoleProtocol.Attach(client.Ref, Follow: true));
        client.ExpectMsg<ConsoleProtocol.History>();
        Watch(followed);
        followed.Tell(new ConsoleProtocol.MovedTo(moved, "127.0.0.1:2"));
        moved.Tell(new ConsoleProtocol.Output(Bytes("still here\n")));
        Assert.Equal("still here\n", Encoding.ASCII.GetString(client.ExpectMsg<ConsoleProtocol.Chunk>().Bytes));
        followed.Tell(new ConsoleProtocol.Detach(client.Ref));
        ExpectTerminated(followed);
    }

    [Fact]
    public void The_history_keeps_the_latest_64_KiB_and_says_where_it_starts()
    {
        var hub = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        var big = new byte[100_000];
        for (var i = 0; i < big.Length; i++) big[i] = (byte)('a' + i % 26);
        hub.Tell(new ConsoleProtocol.Output(big));
        var client = CreateTestProbe();
        hub.Tell(new ConsoleProtocol.Attach(client.Ref, Follow: false));
        var history = client.ExpectMsg<ConsoleProtocol.History>();
        Assert.True(history.Bytes.Length <= ConsoleHubActor.HistoryLimit);
        Assert.True(history.Bytes.Length > ConsoleHubActor.HistoryLimit - ConsoleProtocol.MaxChunk);
        Assert.Equal(big.Length - history.Bytes.Length, history.Offset);
        Assert.Equal(big.AsSpan((int)history.Offset).ToArray(), history.Bytes);
        // Not following: nothing more comes.
        hub.Tell(new ConsoleProtocol.Output(Bytes("x")));
        client.ExpectNoMsg(TimeSpan.FromMilliseconds(200));
    }

    [Fact]
    public void Output_to_followers_is_cut_below_the_remoting_frame_size_and_a_detached_client_gets_nothing()
    {
        var hub = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        var client = CreateTestProbe();
        hub.Tell(new ConsoleProtocol.Attach(client.Ref, Follow: true));
        client.ExpectMsg<ConsoleProtocol.History>();
        hub.Tell(new ConsoleProtocol.Output(new byte[ConsoleProtocol.MaxChunk * 2 + 10]));
        Assert.Equal(ConsoleProtocol.MaxChunk, client.ExpectMsg<ConsoleProtocol.Chunk>().Bytes.Length);
        Assert.Equal(ConsoleProtocol.MaxChunk, client.ExpectMsg<ConsoleProtocol.Chunk>().Bytes.Length);
        Assert.Equal(10, client.ExpectMsg<ConsoleProtocol.Chunk>().Bytes.Length);
        hub.Tell(new ConsoleProtocol.Detach(client.Ref));
        hub.Tell(new ConsoleProtocol.Output(Bytes("more")));
        client.ExpectNoMsg(TimeSpan.FromMilliseconds(200));
    }

    [Fact]
    public void Input_goes_to_the_vms_uart_and_oversized_input_is_dropped()
    {
        // The hub sends to the VM's child "uart0": stand in a VM actor whose child forwards to the test.
        var fakeVm = VmWithUart(TestActor);
        var hub = Sys.ActorOf(ConsoleProtocol.Props("vm"));
        hub.Tell(new ConsoleProtocol.Connect(fakeVm));
        hub.Tell(new ConsoleProtocol.Input(Bytes("ls\n")));
        Assert.Equal("ls\n", Encoding.ASCII.GetString(ExpectMsg<DeviceProtocol.HostInput>().Data));
        hub.Tell(new ConsoleProtocol.Input(new byte[ConsoleProtocol.MaxChunk + 1]));
        ExpectNoMsg(TimeSpan.FromMilliseconds(200));
        hub.Tell(new ConsoleProtocol.VmEnded("stopped"));
        hub.Tell(new ConsoleProtocol.Input(Bytes("late")));
        ExpectNoMsg(TimeSpan.FromMilliseconds(200));
    }

    /// <summary>A stand-in VM actor whose child "uart0" forwards to <paramref name="to"/>, once that child exists
    /// (it is made when the VM actor starts, after ActorOf returns).</summary>
    private IActorRef VmWithUart(IActorRef to)
    {
        var fakeVm = Sys.ActorOf(Props.Create(() => new FakeVm(to)));
        AwaitCondition(() =>
        {
            try { return Sys.ActorSelection(fakeVm.Path / "uart0").ResolveOne(TimeSpan.FromSeconds(1)).Result is not null; }
            catch (AggregateException) { return false; }
        }, TimeSpan.FromSeconds(20));
        return fakeVm;
    }

    private sealed class Forward : UntypedActor
    {
        private readonly IActorRef _to;

        public Forward(IActorRef to) => _to = to;

        protected override void OnReceive(object message) => _to.Tell(message);
    }

    private sealed class FakeVm : UntypedActor
    {
        public FakeVm(IActorRef to) => Context.ActorOf(Props.Create<Forward>(to), "uart0");

        protected override void OnReceive(object message) => Unhandled(message);
    }
}
