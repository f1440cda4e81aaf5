using Akka.Actor;
using Akka.Configuration;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices.Timing;
using ActorVmm.Devices.Tracing;

namespace ActorVmm.Devices.Tests;

/// <summary>
/// The dispatcher the vlapics run on: an actor runs on its sender's thread when it is idle, still
/// one message at a time, bounded in depth, without disturbing the sender's trace context.
/// </summary>
public sealed class InlineDispatcherTests : TestKit
{
    private const string Id = "test-inline";

    public InlineDispatcherTests() : base(ConfigurationFactory.ParseString($$"""
        {{Id}} {
          type = "{{typeof(InlineDispatcherConfigurator).FullName}}, {{typeof(InlineDispatcherConfigurator).Assembly.GetName().Name}}"
          throughput = 64
        }
        """))
    {
    }

    /// <summary>Records the thread each message ran on; checks nobody else was inside at the time.</summary>
    private sealed class Recorder : ReceiveActor
    {
        public static int Inside;
        public static int Overlaps;

        public Recorder(List<int> threads, IActorRef? next, long traceId)
        {
            Receive<string>(s => s == "crash", _ => throw new InvalidOperationException("injected"));
            ReceiveAny(m =>
            {
                if (Interlocked.Increment(ref Inside) > 1) Interlocked.Increment(ref Overlaps);
                if (traceId != 0) TraceContext.Enter(Self, traceId);
                threads.Add(Environment.CurrentManagedThreadId);
                next?.Tell(m);
                Interlocked.Decrement(ref Inside);
            });
        }
    }

    private IActorRef Inline(List<int> threads, IActorRef? next = null, long traceId = 0) =>
        Sys.ActorOf(Props.Create(() => new Recorder(threads, next, traceId)).WithDispatcher(Id));

    /// <summary>Waits until the actor's mailbox has run its creation (the first run may be on any thread).</summary>
    private async Task Started(IActorRef actor)
    {
        await actor.Ask<ActorIdentity>(new Identify(1), TimeSpan.FromSeconds(10));
    }

    [Fact]
    public async Task An_idle_actor_handles_the_message_on_the_senders_thread_before_Tell_returns()
    {
        var threads = new List<int>();
        var actor = Inline(threads);
        await Started(actor);
        var me = 0;
        var countAfterTell = -1;
        var t = new Thread(() =>
        {
            me = Environment.CurrentManagedThreadId;
            actor.Tell(1);
            lock (threads) countAfterTell = threads.Count;
        });
        t.Start();
        Assert.True(t.Join(TimeSpan.FromSeconds(10)));
        Assert.Equal(1, countAfterTell);
        Assert.Equal([me], threads);
    }

    [Fact]
    public async Task Two_threads_sending_at_once_never_run_the_actor_twice_at_the_same_time_and_lose_nothing()
    {
        Recorder.Overlaps = 0;
        var threads = new List<int>();
        var actor = Inline(threads);
        await Started(actor);
        const int each = 20_000;
        var senders = Enumerable.Range(0, 2).Select(_ => new Thread(() =>
        {
            for (var i = 0; i < each; i++) actor.Tell(i);
        })).ToList();
        senders.ForEach(s => s.Start());
        senders.ForEach(s => Assert.True(s.Join(TimeSpan.FromSeconds(30))));
        await AwaitConditionAsync(() => Task.FromResult(Volatile.Read(ref Recorder.Inside) == 0 && threads.Count == 2 * each),
            TimeSpan.FromSeconds(10));
        Assert.Equal(0, Recorder.Overlaps);
    }

    [Fact]
    public async Task A_chain_longer_than_the_depth_limit_continues_on_the_pool_and_delivers_everything()
    {
        var threads = new List<int>[20];
        IActorRef? next = null;
        var chain = new IActorRef[threads.Length];
        for (var i = threads.Length - 1; i >= 0; i--)
        {
            threads[i] = [];
            next = chain[i] = Inline(threads[i], next);
            await Started(next);
        }
        var pooledBefore = InlineDispatcher.Pooled;
        var sender = 0;
        var t = new Thread(() =>
        {
            sender = Environment.CurrentManagedThreadId;
            chain[0].Tell("go");
        });
        t.Start();
        Assert.True(t.Join(TimeSpan.FromSeconds(10)));
        await AwaitConditionAsync(() => Task.FromResult(threads[^1].Count == 1), TimeSpan.FromSeconds(10));
        // The first MaxDepth links ran on the sender's thread; the rest went to the pool.
        for (var i = 0; i < InlineDispatcher.MaxDepth; i++) Assert.Equal([sender], threads[i]);
        Assert.NotEqual(sender, threads[InlineDispatcher.MaxDepth].Single());
        Assert.True(InlineDispatcher.Pooled > pooledBefore);
    }

    [Fact]
    public async Task The_senders_trace_context_is_the_same_after_an_inline_run()
    {
        var actor = Inline([], traceId: 7);
        await Started(actor);
        long parentAfter = -1;
        var owner = TestActor;
        var t = new Thread(() =>
        {
            TraceContext.Enter(owner, 42);
            actor.Tell("x");
            parentAfter = TraceContext.ParentFor(owner);
        });
        t.Start();
        Assert.True(t.Join(TimeSpan.FromSeconds(10)));
        Assert.Equal(42, parentAfter);
    }

    [Fact]
    public async Task A_failure_in_an_inline_run_goes_to_the_supervisor_not_to_the_sender()
    {
        var threads = new List<int>();
        var actor = Inline(threads);
        await Started(actor);
        Exception? thrown = null;
        var t = new Thread(() =>
        {
            try { actor.Tell("crash"); actor.Tell(5); }
            catch (Exception e) { thrown = e; }
        });
        t.Start();
        Assert.True(t.Join(TimeSpan.FromSeconds(10)));
        Assert.Null(thrown);
        // Restarted by the default strategy, it handles the next message.
        await AwaitConditionAsync(() => Task.FromResult(threads.Count == 1), TimeSpan.FromSeconds(10));
    }
}
