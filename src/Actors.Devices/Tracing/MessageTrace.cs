using System.Collections.Immutable;
using Akka.Actor;
using Akka.Configuration;
using Akka.Dispatch;
using Akka.Dispatch.MessageQueues;

namespace ActorVmm.Devices.Tracing;

/// <summary>A message type that is never traced (internal loop ticks such as the vcpu's Run).</summary>
public interface INotTraced;

/// <summary>Receives every traced message on enqueue, on the sender's thread. Must not block.</summary>
public interface ITraceSink
{
    void Record(IActorRef? sender, IActorRef receiver, object message);
}

/// <summary>
/// Which trace sink watches which actors: a VM registers its sink for its actor path prefix
/// before it creates its actors; a mailbox looks its sink up once, when it is created. With no
/// sink registered a mailbox traces nothing and pays one null check per message.
/// </summary>
public static class MessageTraceRegistry
{
    private static ImmutableList<(string Prefix, ITraceSink Sink)> _sinks = ImmutableList<(string, ITraceSink)>.Empty;

    /// <param name="pathPrefix">an actor path without address, e.g. "/user/vm-demo"</param>
    public static IDisposable Register(string pathPrefix, ITraceSink sink)
    {
        var entry = (pathPrefix.TrimEnd('/') + "/", sink);
        ImmutableInterlocked.Update(ref _sinks, l => l.Add(entry));
        return new Registration(entry);
    }

    public static ITraceSink? SinkFor(IActorRef owner)
    {
        var sinks = _sinks;
        if (sinks.IsEmpty) return null;
        var path = owner.Path.ToStringWithoutAddress() + "/";
        foreach (var (prefix, sink) in sinks)
            if (path.StartsWith(prefix, StringComparison.Ordinal)) return sink;
        return null;
    }

    private sealed class Registration((string, ITraceSink) entry) : IDisposable
    {
        public void Dispose() => ImmutableInterlocked.Update(ref _sinks, l => l.Remove(entry));
    }
}

/// <summary>
/// A deque-based mailbox (stash works) that records each enqueued message to the trace sink of
/// its owner's VM. Used for a VM's actors when tracing is on; see <c>actorvmm.traced-mailbox</c>.
/// </summary>
public sealed class TracedMailboxType(Settings settings, Config config)
    : MailboxType(settings, config), IProducesMessageQueue<TracedMessageQueue>
{
    public const string Id = "actorvmm.traced-mailbox";

    public const string DefaultConfig = """
        actorvmm.traced-mailbox {
          mailbox-type = "ActorVmm.Devices.Tracing.TracedMailboxType, ActorVmm.Actors.Devices"
        }
        """;

    public override IMessageQueue Create(IActorRef owner, ActorSystem system) =>
        new TracedMessageQueue(owner, MessageTraceRegistry.SinkFor(owner));
}

public sealed class TracedMessageQueue(IActorRef owner, ITraceSink? sink) : IMessageQueue, IUnboundedDequeBasedMessageQueueSemantics
{
    private readonly UnboundedDequeMessageQueue _queue = new();

    public bool HasMessages => _queue.HasMessages;
    public int Count => _queue.Count;

    public void Enqueue(IActorRef receiver, Envelope envelope)
    {
        if (sink is not null && envelope.Message is not INotTraced) sink.Record(envelope.Sender, owner, envelope.Message);
        _queue.Enqueue(receiver, envelope);
    }

    public void EnqueueFirst(Envelope envelope) => _queue.EnqueueFirst(envelope);
    public bool TryDequeue(out Envelope envelope) => _queue.TryDequeue(out envelope);
    public void CleanUp(IActorRef owner, IMessageQueue deadletters) => _queue.CleanUp(owner, deadletters);
}
