using Akka.Configuration;
using Akka.Dispatch;
using ActorVmm.Devices.Tracing;

namespace ActorVmm.Devices.Timing;

/// <summary>
/// Runs an actor's mailbox on the thread that sends to it, when nobody else is running it: the
/// seed's vlapic, which runs in the context of the vcpu that touches it (a vcpu's APIC page access
/// or MSR exit, an IPI from another vcpu) instead of on a pool thread it must first wake.
/// The actor still handles one message at a time (the mailbox's own scheduled flag decides who
/// runs it: a sender that finds it running only enqueues, and the running thread drains it).
/// Past <see cref="MaxDepth"/> nested inline runs on one thread (a chain of inline actors, or a
/// mailbox that re-schedules itself after a full batch) the run goes to the thread pool instead,
/// so nothing recurses without bound.
/// The trace context (which message the thread is handling, for causal parents) is kept across
/// an inline run, so the sender's later messages still name their parent.
/// </summary>
public sealed class InlineDispatcher(MessageDispatcherConfigurator configurator) : MessageDispatcher(configurator)
{
    /// <summary>Nested inline runs on one thread before the next goes to the pool.</summary>
    public const int MaxDepth = 8;

    [ThreadStatic] private static int _depth;

    private static long _pooled;

    /// <summary>Mailbox runs sent to the pool past the depth limit (all inline dispatchers); inline
    /// runs are not counted: they are the hot path of every APIC access.</summary>
    public static long Pooled => Interlocked.Read(ref _pooled);

    protected override void ExecuteTask(IRunnable run)
    {
        if (_depth >= MaxDepth)
        {
            Interlocked.Increment(ref _pooled);
            ThreadPool.UnsafeQueueUserWorkItem(static r => r.Run(), run, preferLocal: false);
            return;
        }
        var saved = TraceContext.Save();
        _depth++;
        try { run.Run(); }
        finally
        {
            _depth--;
            TraceContext.Restore(saved);
        }
    }

    protected override void Shutdown() { }
}

/// <summary>Configured as <c>type = "ActorVmm.Devices.Timing.InlineDispatcherConfigurator, ActorVmm.Actors.Devices"</c>.</summary>
public sealed class InlineDispatcherConfigurator : MessageDispatcherConfigurator
{
    private readonly InlineDispatcher _dispatcher;

    public InlineDispatcherConfigurator(Config config, IDispatcherPrerequisites prerequisites) : base(config, prerequisites) =>
        _dispatcher = new InlineDispatcher(this);

    public override MessageDispatcher Dispatcher() => _dispatcher;
}
