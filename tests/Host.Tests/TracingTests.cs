using System.Text.Json;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Tracing;
using ActorVmm.Vcpu;
using Akka.Actor;
using Akka.TestKit;
using Xunit.Abstractions;

namespace ActorVmm.Host.Tests;

public sealed class TracingTests(ITestOutputHelper output) : Akka.TestKit.Xunit2.TestKit(TracedMailboxType.DefaultConfig, output)
{
    /// <summary>Creates one child (and tells the probe its ref), forwards everything to it.</summary>
    private sealed class Parent : ReceiveActor
    {
        public Parent(IActorRef probe, string childName, Props childProps)
        {
            var child = Context.ActorOf(childProps, childName);
            probe.Tell(child);
            ReceiveAny(m => child.Forward(m));
        }
    }

    /// <summary>Tells the probe every message it processes.</summary>
    private sealed class Echo : ReceiveActor
    {
        public Echo(IActorRef probe) => ReceiveAny(m => probe.Tell(m));
    }

    private sealed record Tick : INotTraced
    {
        public static readonly Tick Instance = new();
    }

    private sealed record Carrier(IActorRef Target, string Note);

    private sealed record Unwritable(Func<int> Callback);

    private IActorRef Child(string parent, string child, TestProbe probe, Props? childProps = null)
    {
        Sys.ActorOf(Props.Create(() => new Parent(probe.Ref, child, childProps ?? Props.Create(() => new Echo(probe.Ref)))), parent);
        return probe.ExpectMsg<IActorRef>();
    }

    // ---- TraceRecorder ----

    [Fact]
    public async Task Snapshot_returns_recorded_events_in_order_with_short_names()
    {
        var probe = CreateTestProbe();
        var uart = Child("vm-order", "uart0", probe);
        var vm = await Sys.ActorSelection("/user/vm-order").ResolveOne(TimeSpan.FromSeconds(3));
        var recorder = new TraceRecorder();

        recorder.Record(vm, uart, new DeviceProtocol.Write(0, 1, 0x41));
        recorder.Record(uart, vm, new DeviceProtocol.WriteCredit(64));
        recorder.Record(null, uart, DeviceProtocol.GetStats.Instance);

        var events = recorder.Snapshot();
        Assert.Equal(3, recorder.Count);
        Assert.Equal(["Write", "WriteCredit", "GetStats"], events.Select(e => e.Type));
        Assert.Equal(("vm-order", "uart0"), (events[0].Sender, events[0].Receiver));
        Assert.Equal(("uart0", "vm-order"), (events[1].Sender, events[1].Receiver));
        Assert.Equal("(none)", events[2].Sender);
        Assert.Equal(new DeviceProtocol.Write(0, 1, 0x41), events[0].Message);
        Assert.True(events[0].Nanoseconds <= events[1].Nanoseconds && events[1].Nanoseconds <= events[2].Nanoseconds);
        Assert.Contains("uart0", TraceRecorder.ToText(events[0]));
    }

    [Fact]
    public void The_ring_keeps_only_the_latest_capacity_events()
    {
        var recorder = new TraceRecorder(capacity: 3);
        for (var i = 0; i < 8; i++) recorder.Record(TestActor, TestActor, new DeviceProtocol.WriteCredit(i));
        Assert.Equal(3, recorder.Capacity);
        Assert.Equal(8, recorder.Count);
        Assert.Equal([5, 6, 7], recorder.Snapshot().Select(e => ((DeviceProtocol.WriteCredit)e.Message).Count));
    }

    private sealed record WithPendingTask(int N, TaskCompletionSource<double> Done);

    [Fact]
    public async Task A_message_carrying_an_unfinished_task_is_written_without_waiting_for_it()
    {
        var pending = new TaskCompletionSource<double>();
        var e = new TraceEvent(1, 0, 0, "a", "b", new WithPendingTask(7, pending));
        var line = await Task.Run(() => TraceRecorder.ToJsonLine(e)).WaitAsync(TimeSpan.FromSeconds(30));
        using var doc = JsonDocument.Parse(line);
        Assert.Equal(7, doc.RootElement.GetProperty("msg").GetProperty("N").GetInt32());
        Assert.StartsWith("<TaskCompletionSource", doc.RootElement.GetProperty("msg").GetProperty("Done").GetString());
        Assert.False(pending.Task.IsCompleted);
    }

    [Fact]
    public async Task A_recorder_writes_every_event_to_its_file_through_a_bounded_backlog()
    {
        using var dir = new TempDir();
        var path = dir.File("trace.jsonl");
        var uart = Child("vm-backlog", "uart0", CreateTestProbe());
        var recorder = new TraceRecorder(path, capacity: 16);
        var events = TraceRecorder.FileBacklog * 3; // more than the backlog holds: senders wait, nothing is dropped
        for (var i = 0; i < events; i++) recorder.Record(TestActor, uart, new DeviceProtocol.Write(0, 1, (ulong)(i & 0xFF)));
        await recorder.DisposeAsync();

        Assert.Null(recorder.WriteFailure);
        Assert.Equal(0, recorder.Lost);
        Assert.Equal(events, File.ReadLines(path).Count());
    }

    [Fact]
    public async Task A_trace_file_that_cannot_be_written_is_reported_and_does_not_hold_up_the_senders()
    {
        Assert.True(File.Exists("/dev/full"), "/dev/full (every write fails with ENOSPC) is missing");
        var uart = Child("vm-full", "uart0", CreateTestProbe());
        var recorder = new TraceRecorder("/dev/full", capacity: 16);
        var events = TraceRecorder.FileBacklog * 3;
        var sending = Task.Run(() =>
        {
            for (var i = 0; i < events; i++) recorder.Record(TestActor, uart, new DeviceProtocol.Write(0, 1, 0x41));
        });
        Assert.True(await Task.WhenAny(sending, Task.Delay(TimeSpan.FromMinutes(1))) == sending, "senders are stuck behind a failed trace file");
        await recorder.DisposeAsync();

        Assert.IsType<IOException>(recorder.WriteFailure);
        Assert.True(recorder.Lost > 0);
        Assert.Equal(16, recorder.Snapshot().Count); // the ring goes on
    }

    [Fact]
    public async Task A_recorder_with_a_path_writes_one_json_object_per_line()
    {
        using var dir = new TempDir();
        var path = dir.File("trace.jsonl");
        var probe = CreateTestProbe();
        var uart = Child("vm-json", "uart0", probe);
        var recorder = new TraceRecorder(path);
        recorder.Record(TestActor, uart, new DeviceProtocol.HostInput([0x68, 0x69]));
        recorder.Record(uart, TestActor, new VcpuProtocol.Stopped(0, VcpuProtocol.StopReason.TripleFault, "line 1\nline \"2\""));
        recorder.Record(null, uart, new Carrier(probe.Ref, "ref inside"));
        recorder.Record(null, uart, new Unwritable(() => 42));
        await recorder.DisposeAsync();

        var lines = File.ReadAllLines(path);
        Assert.Equal(4, lines.Length);
        var docs = lines.Select(l => JsonDocument.Parse(l)).ToArray();
        try
        {
            long last = 0;
            foreach (var d in docs)
            {
                var root = d.RootElement;
                Assert.Equal(JsonValueKind.Object, root.ValueKind);
                Assert.Equal(["id", "parent", "t_ns", "sender", "receiver", "type", "msg"], root.EnumerateObject().Select(p => p.Name));
                var t = root.GetProperty("t_ns").GetInt64();
                Assert.True(t >= last);
                last = t;
                Assert.Contains("uart0", new[] { root.GetProperty("sender").GetString(), root.GetProperty("receiver").GetString() });
            }
            Assert.Equal("HostInput", docs[0].RootElement.GetProperty("type").GetString());
            Assert.Equal(TestActor.Path.ToStringWithoutAddress(), docs[0].RootElement.GetProperty("sender").GetString());
            Assert.Equal(Convert.ToBase64String([0x68, 0x69]), docs[0].RootElement.GetProperty("msg").GetProperty("Data").GetString());

            var stopped = docs[1].RootElement.GetProperty("msg");
            Assert.Equal("TripleFault", stopped.GetProperty("Reason").GetString());
            Assert.Equal("line 1\nline \"2\"", stopped.GetProperty("Report").GetString());

            Assert.Equal("(none)", docs[2].RootElement.GetProperty("sender").GetString());
            Assert.Equal(probe.Ref.Path.ToStringWithoutAddress(), docs[2].RootElement.GetProperty("msg").GetProperty("Target").GetString());

            // A message System.Text.Json cannot write still yields a valid line.
            Assert.Equal("Unwritable", docs[3].RootElement.GetProperty("type").GetString());
            Assert.True(docs[3].RootElement.GetProperty("msg").TryGetProperty("unserializable", out _));
        }
        finally
        {
            foreach (var d in docs) d.Dispose();
        }
    }

    // ---- MessageTraceRegistry ----

    [Fact]
    public async Task A_sink_is_found_for_actors_under_its_prefix_only()
    {
        var probe = CreateTestProbe();
        var x = Child("vm-x", "uart0", probe);
        var y = Child("vm-y", "uart0", probe);
        var xy = Child("vm-xy", "uart0", probe);
        var vmX = await Sys.ActorSelection("/user/vm-x").ResolveOne(TimeSpan.FromSeconds(3));
        var sink = new TraceRecorder();

        using (MessageTraceRegistry.Register(Sys, "/user/vm-x", sink))
        {
            Assert.Same(sink, MessageTraceRegistry.SinkFor(Sys, x));
            Assert.Same(sink, MessageTraceRegistry.SinkFor(Sys, vmX));
            Assert.Null(MessageTraceRegistry.SinkFor(Sys, y));
            Assert.Null(MessageTraceRegistry.SinkFor(Sys, xy));
        }
        Assert.Null(MessageTraceRegistry.SinkFor(Sys, x));
    }

    [Fact]
    public async Task A_sink_belongs_to_one_actor_system_even_where_another_has_the_same_paths()
    {
        var sink = new TraceRecorder();
        using var other = ActorSystem.Create(Sys.Name); // same name, same "/user/vm-same/uart0"
        try
        {
            var mine = Child("vm-same", "uart0", CreateTestProbe());
            var theirs = other.ActorOf(Props.Empty, "vm-same");
            using var registration = MessageTraceRegistry.Register(Sys, "/user/vm-same", sink);
            Assert.Same(sink, MessageTraceRegistry.SinkFor(Sys, mine));
            Assert.Null(MessageTraceRegistry.SinkFor(other, theirs));
        }
        finally
        {
            await other.Terminate();
        }
    }

    [Fact]
    public void A_trailing_slash_in_the_prefix_makes_no_difference()
    {
        var probe = CreateTestProbe();
        var a = Child("vm-slash", "uart0", probe);
        var sink = new TraceRecorder();
        using var registration = MessageTraceRegistry.Register(Sys, "/user/vm-slash/", sink);
        Assert.Same(sink, MessageTraceRegistry.SinkFor(Sys, a));
    }

    // ---- TracedMailbox ----

    [Fact]
    public void A_traced_mailbox_records_every_message_but_not_INotTraced_ones_nor_path_lookups()
    {
        var recorder = new TraceRecorder();
        var probe = CreateTestProbe();
        using var registration = MessageTraceRegistry.Register(Sys, "/user/traced", recorder);
        var child = Child("traced", "child-name", probe,
            Props.Create(() => new Echo(probe.Ref)).WithMailbox(TracedMailboxType.Id));

        child.Tell(new DeviceProtocol.Write(1, 1, 0x55), TestActor);
        child.Tell(Tick.Instance, TestActor);
        child.Tell(new Identify("who"), TestActor); // a path lookup (e.g. from actorvmm ctl): not the VM's own traffic
        ExpectMsg<ActorIdentity>();
        child.Tell(new DeviceProtocol.Read(7, 5, 1), TestActor);
        probe.ExpectMsg<DeviceProtocol.Write>();
        probe.ExpectMsg<Tick>();
        probe.ExpectMsg<DeviceProtocol.Read>();

        var events = recorder.Snapshot();
        Assert.Equal(["Write", "Read"], events.Select(e => e.Type));
        Assert.All(events, e => Assert.Equal("child-name", e.Receiver));
        Assert.All(events, e => Assert.Equal(TestActor.Path.ToStringWithoutAddress(), e.Sender));
        Assert.Equal(new DeviceProtocol.Read(7, 5, 1), events[1].Message);
    }

    [Fact]
    public void An_actor_with_the_default_mailbox_is_not_traced()
    {
        var recorder = new TraceRecorder();
        var probe = CreateTestProbe();
        using var registration = MessageTraceRegistry.Register(Sys, "/user/untraced", recorder);
        var child = Child("untraced", "child-name", probe);
        child.Tell(new DeviceProtocol.Write(1, 1, 0x55));
        probe.ExpectMsg<DeviceProtocol.Write>();
        Assert.Equal(0, recorder.Count);
    }

    [Fact]
    public void A_traced_mailbox_without_a_sink_still_delivers()
    {
        var probe = CreateTestProbe();
        var child = Child("no-sink", "child-name", probe, Props.Create(() => new Echo(probe.Ref)).WithMailbox(TracedMailboxType.Id));
        child.Tell("hello");
        probe.ExpectMsg("hello");
    }
}
