using System.Collections.Concurrent;
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
    /// <param name="id">this message's trace id (unique in the process)</param>
    /// <param name="parentId">the id of the message whose handling sent this one; 0 if none
    /// (sent from outside the actors, or by an untraced actor)</param>
    /// <param name="sender">the sending actor; null when sent from outside the actors</param>
    /// <param name="receiver">the actor whose mailbox takes it</param>
    /// <param name="message">the message itself (not to be kept past the call if the sink copies nothing)</param>
    void Record(long id, long parentId, IActorRef? sender, IActorRef receiver, object message);
}

/// <summary>
/// Causality for traces: which traced message the current thread is handling. A traced mailbox
/// sets it when it hands a message to its actor; a message enqueued while the same actor is its
/// sender gets that message as its parent. A stale value (the thread moved on to an untraced
/// actor) is ignored because its owner is not the sender.
/// </summary>
public static class TraceContext
{
    [ThreadStatic] private static IActorRef? _owner;
    [ThreadStatic] private static long _current;

    /// <summary>Ids are unique among the processes of a cluster, so that one trace can hold the events of
    /// several nodes: a random 12-bit process tag above a 40-bit counter (below 2^53, so that JavaScript
    /// viewers such as Perfetto read them exactly). Two processes share a tag with odds of 1 in 4,096; their
    /// ids could then meet in one trace only after both counted to the same values.</summary>
    private static long _lastId = Random.Shared.NextInt64(1, 1 << 12) << 40;

    public static long NextId() => Interlocked.Increment(ref _lastId);

    /// <summary>The actor <paramref name="owner"/> is now handling trace event <paramref name="id"/>.</summary>
    public static void Enter(IActorRef owner, long id)
    {
        _owner = owner;
        _current = id;
    }

    /// <summary>What this thread is handling, to put back after it ran another actor inline.</summary>
    public static (IActorRef? Owner, long Current) Save() => (_owner, _current);

    public static void Restore((IActorRef? Owner, long Current) saved) => (_owner, _current) = saved;

    /// <summary>The parent for a message <paramref name="sender"/> sends now.</summary>
    public static long ParentFor(IActorRef? sender) =>
        sender is not null && _owner is not null && (ReferenceEquals(_owner, sender) || sender.Equals(_owner)) ? _current : 0;

    /// <summary>The actor goes on with an untraced message (a loop tick): the chain continues
    /// from what it handled last, if that was its own.</summary>
    public static void Continue(IActorRef owner)
    {
        if (!ReferenceEquals(_owner, owner)) Enter(owner, 0);
    }

    /// <summary>Records a message to the sink with a fresh id and the current parent; returns the id.</summary>
    public static long Record(ITraceSink sink, IActorRef? sender, IActorRef receiver, object message)
    {
        var id = NextId();
        sink.Record(id, ParentFor(sender), sender, receiver, message);
        return id;
    }
}

/// <summary>
/// A message between two nodes that carries its causal parent, for a trace that spans nodes: the sending
/// side wraps it (<see cref="CarryingRef"/>), the receiving actor's traced mailbox unwraps it
/// (<see cref="TracedMessageQueue"/>), records <see cref="Payload"/> with <see cref="TraceParent"/> as its
/// parent, and hands the actor <see cref="Payload"/> as if it had come alone, from a sender that carries
/// the parent of what the actor sends back in the same way.
/// </summary>
/// <param name="TraceParent">the trace id of the message whose handling sent this one (0: none)</param>
/// <param name="Payload">the message</param>
public sealed record CarriedMessage(long TraceParent, object Payload);

/// <summary>
/// A reference to <see cref="Target"/> (an actor on another node) that wraps every message told through it
/// in a <see cref="CarriedMessage"/> with the trace id of the message its sender is handling now. Equal to
/// its target (same path and uid), so it can stand for it as a dictionary key.
/// </summary>
public sealed class CarryingRef(IActorRef target, IActorRefProvider provider) : MinimalActorRef
{
    public IActorRef Target { get; } = target;

    public override ActorPath Path => Target.Path;

    public override IActorRefProvider Provider => provider;

    protected override void TellInternal(object message, IActorRef sender) =>
        Target.Tell(message is CarriedMessage ? message : new CarriedMessage(TraceContext.ParentFor(sender), message), sender);

    public override bool Equals(object? obj) => Target.Equals(obj is CarryingRef c ? c.Target : obj);

    public override int GetHashCode() => Target.GetHashCode();

    /// <summary><paramref name="actor"/> through a carrying reference, unless it is none or one already.</summary>
    public static IActorRef Around(IActorRef actor, ActorSystem system) =>
        actor is CarryingRef || actor.IsNobody() ? actor : new CarryingRef(actor, ((ExtendedActorSystem)system).Provider);
}

/// <summary>
/// Which trace sink watches which actors: a VM registers its sink for its actor system and actor
/// path prefix before it creates its actors; a mailbox looks its sink up once, when it is created.
/// With no sink registered a mailbox traces nothing and pays one null check per message. (The
/// system is part of the key: several actor systems in one process may each have a "/user/vm-guest".)
/// </summary>
public static class MessageTraceRegistry
{
    private static readonly PathRegistry<ITraceSink> Sinks = new();

    /// <param name="pathPrefix">an actor path without address, e.g. "/user/vm-demo"</param>
    /// <param name="system">the actor system whose actors are traced</param>
    /// <param name="sink">receives their messages; disposing the result unregisters it</param>
    public static IDisposable Register(ActorSystem system, string pathPrefix, ITraceSink sink) => Sinks.Register(system, pathPrefix, sink);

    public static ITraceSink? SinkFor(ActorSystem system, IActorRef owner) => Sinks.Find(system, owner);
}

/// <summary>Entries keyed by actor system and actor path prefix (the trace and link-fault registries).</summary>
internal sealed class PathRegistry<T> where T : class
{
    private ImmutableList<(ActorSystem System, string Prefix, T Value)> _entries = ImmutableList<(ActorSystem, string, T)>.Empty;

    public IDisposable Register(ActorSystem system, string pathPrefix, T value)
    {
        var entry = (system, pathPrefix.TrimEnd('/') + "/", value);
        ImmutableInterlocked.Update(ref _entries, l => l.Add(entry));
        return new Registration(this, entry);
    }

    public T? Find(ActorSystem system, IActorRef owner)
    {
        var entries = _entries;
        if (entries.IsEmpty) return null;
        var path = owner.Path.ToStringWithoutAddress() + "/";
        foreach (var (s, prefix, value) in entries)
            if (ReferenceEquals(s, system) && path.StartsWith(prefix, StringComparison.Ordinal)) return value;
        return null;
    }

    private sealed class Registration(PathRegistry<T> registry, (ActorSystem, string, T) entry) : IDisposable
    {
        public void Dispose() => ImmutableInterlocked.Update(ref registry._entries, l => l.Remove(entry));
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
        new TracedMessageQueue(owner, MessageTraceRegistry.SinkFor(system, owner), LinkFaultRegistry.PlanFor(system, owner)) { System = system };
}

/// <summary>
/// An unbounded deque that records each message to <paramref name="sink"/> on enqueue (with its
/// trace id and causal parent) and, on dequeue, tells <see cref="TraceContext"/> which message
/// its actor is handling. Messages put back by an unstash keep no id: their children get no parent.
/// </summary>
/// <param name="arrived">called after a message is in the queue (a vcpu's mailbox kicks there, so a
/// delayed message kicks when it arrives, not when it was sent)</param>
/// <param name="owner">the actor whose mailbox this is</param>
/// <param name="sink">records each message on enqueue; null: nothing is recorded</param>
/// <param name="faults">link faults (drops, delays) applied on enqueue; null: none</param>
public sealed class TracedMessageQueue(IActorRef owner, ITraceSink? sink, LinkFaultPlan? faults = null, Action<Envelope>? arrived = null)
    : IMessageQueue, IUnboundedDequeBasedMessageQueueSemantics
{
    private readonly ConcurrentQueue<(Envelope Envelope, long Id)> _queue = new();

    /// <summary>The owner's actor system: a <see cref="CarriedMessage"/>'s sender is wrapped in a
    /// <see cref="CarryingRef"/> of it. Null: carried messages are unwrapped, their senders left as they are.</summary>
    public ActorSystem? System { get; init; }
    private readonly Stack<Envelope> _prepended = new(); // only the actor's own thread prepends and dequeues

    public bool HasMessages => _prepended.Count > 0 || !_queue.IsEmpty;
    public int Count => _prepended.Count + _queue.Count;

    public void Enqueue(IActorRef receiver, Envelope envelope)
    {
        if (faults is not null && envelope.Message is not INotTraced && !LinkFaultPlan.IsBypassing)
        {
            // Fault injection decides whether, when and how often the message arrives. What it
            // holds back comes again later through the actor ref, so the mailbox gets scheduled.
            faults.Deliver(envelope.Sender, owner, envelope, Arrive, e => LinkFaultPlan.Redeliver(owner, e));
            return;
        }
        Arrive(envelope);
    }

    private void Arrive(Envelope envelope)
    {
        long id = 0;
        long? carriedParent = null;
        if (envelope.Message is CarriedMessage carried)
        {
            // From another node, with its parent: the actor gets the message alone, and what it sends
            // back to the sender carries the parent on (CarryingRef).
            carriedParent = carried.TraceParent;
            var sender = System is not null && envelope.Sender is { } from ? CarryingRef.Around(from, System) : envelope.Sender;
            envelope = new Envelope(carried.Payload, sender);
        }
        if (sink is not null && envelope.Message is not (INotTraced or Identify or ActorIdentity))
        {
            // (Identify comes from whoever resolves an actor's path, e.g. `actorvmm ctl`: not the VM's own.)
            id = TraceContext.NextId();
            sink.Record(id, carriedParent ?? TraceContext.ParentFor(envelope.Sender), envelope.Sender, owner, envelope.Message);
        }
        _queue.Enqueue((envelope, id));
        arrived?.Invoke(envelope);
    }

    public void EnqueueFirst(Envelope envelope) => _prepended.Push(envelope);

    /// <summary>The message <see cref="TryDequeue"/> would take next, left in place (the owner's
    /// thread only: it alone dequeues, so what it saw is what it takes).</summary>
    public bool TryPeek([System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out object? message)
    {
        if (_prepended.TryPeek(out var prepended))
        {
            message = prepended.Message;
            return true;
        }
        if (_queue.TryPeek(out var entry))
        {
            message = entry.Envelope.Message;
            return true;
        }
        message = null;
        return false;
    }

    public bool TryDequeue(out Envelope envelope)
    {
        if (_prepended.TryPop(out envelope))
        {
            TraceContext.Enter(owner, 0);
            return true;
        }
        if (_queue.TryDequeue(out var entry))
        {
            envelope = entry.Envelope;
            if (entry.Id == 0 && envelope.Message is INotTraced) TraceContext.Continue(owner);
            else TraceContext.Enter(owner, entry.Id);
            return true;
        }
        envelope = default;
        return false;
    }

    public void CleanUp(IActorRef owner, IMessageQueue deadletters)
    {
        while (TryDequeue(out var envelope)) deadletters.Enqueue(owner, envelope);
    }
}
