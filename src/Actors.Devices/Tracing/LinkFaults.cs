using System.Collections.Concurrent;
using System.Collections.Immutable;
using Akka.Actor;
using Akka.Dispatch;

namespace ActorVmm.Devices.Tracing;

/// <summary>What happens to messages on a link.</summary>
public enum LinkFaultKind { Drop, Delay, Duplicate }

/// <summary>
/// A fault on the link from <see cref="Sender"/> to <see cref="Receiver"/> (actor names below the
/// VM, e.g. "vcpu-0" → "uart0"; "*" = any), for messages of <see cref="MessageType"/> (simple type
/// name; "*" = any). Delay keeps the link's order: a delayed message holds back the ones behind it.
/// </summary>
public sealed record LinkFault(string Sender, string Receiver, string MessageType, LinkFaultKind Kind, TimeSpan Delay = default)
{
    public bool Matches(string sender, string receiver, string type) =>
        (Sender == "*" || Sender == sender) && (Receiver == "*" || Receiver == receiver) && (MessageType == "*" || MessageType == type);
}

/// <summary>
/// The link faults of one VM, consulted by its mailboxes on enqueue (only for VMs built for
/// fault injection; others pay nothing). Counters say what was done.
/// </summary>
public sealed class LinkFaultPlan
{
    private ImmutableList<LinkFault> _faults = ImmutableList<LinkFault>.Empty;
    private readonly ConcurrentDictionary<(string, string), DelayLine> _lines = new();
    private long _dropped, _delayed, _duplicated;

    [ThreadStatic] private static bool _bypass;

    /// <summary>True while a held-back message is being handed to its receiver again.</summary>
    public static bool IsBypassing => _bypass;

    /// <summary>Sends a held-back message to its receiver through the actor ref (so the receiver's
    /// mailbox is scheduled), without applying the plan to it a second time.</summary>
    public static void Redeliver(IActorRef receiver, Envelope envelope)
    {
        _bypass = true;
        try { receiver.Tell(envelope.Message, envelope.Sender); }
        finally { _bypass = false; }
    }

    public long Dropped => Interlocked.Read(ref _dropped);
    public long Delayed => Interlocked.Read(ref _delayed);
    public long Duplicated => Interlocked.Read(ref _duplicated);

    public void Add(LinkFault fault) => ImmutableInterlocked.Update(ref _faults, l => l.Add(fault));
    public void Clear() => ImmutableInterlocked.Update(ref _faults, _ => ImmutableList<LinkFault>.Empty);

    /// <summary>Delivers <paramref name="envelope"/> as the plan says: not at all, later (in link
    /// order), or twice. <paramref name="now"/> puts a message in the receiver's queue at once;
    /// <paramref name="later"/> hands a held-back one to the receiver again (from a timer thread).</summary>
    public void Deliver(IActorRef? sender, IActorRef receiver, Envelope envelope, Action<Envelope> now, Action<Envelope> later)
    {
        var from = sender is null || sender.IsNobody() ? "" : sender.Path.Name;
        var to = receiver.Path.Name;
        var line = _lines.TryGetValue((from, to), out var l) ? l : null;
        var fault = _faults.FirstOrDefault(f => f.Matches(from, to, envelope.Message.GetType().Name));
        switch (fault?.Kind)
        {
            case LinkFaultKind.Drop:
                Interlocked.Increment(ref _dropped);
                return;
            case LinkFaultKind.Duplicate:
                Interlocked.Increment(ref _duplicated);
                Send(line, envelope, now, later);
                Send(line, envelope, now, later);
                return;
            case LinkFaultKind.Delay:
                Interlocked.Increment(ref _delayed);
                line ??= _lines.GetOrAdd((from, to), _ => new DelayLine());
                line.Add(envelope, later, fault.Delay);
                return;
            default:
                Send(line, envelope, now, later);
                return;
        }
    }

    private static void Send(DelayLine? line, Envelope envelope, Action<Envelope> now, Action<Envelope> later)
    {
        if (line is null || line.IsEmpty) now(envelope);
        else line.Add(envelope, later, TimeSpan.Zero); // behind what the link is still holding back
    }

    /// <summary>A link's messages in order, each released no earlier than its due time.</summary>
    private sealed class DelayLine
    {
        private readonly Queue<(long Due, Envelope Envelope, Action<Envelope> Enqueue)> _queue = new();
        private readonly Timer _timer;

        public DelayLine() => _timer = new Timer(_ => Release());

        public bool IsEmpty
        {
            get { lock (_queue) return _queue.Count == 0; }
        }

        public void Add(Envelope envelope, Action<Envelope> enqueue, TimeSpan delay)
        {
            lock (_queue)
            {
                var due = Environment.TickCount64 + (long)delay.TotalMilliseconds;
                if (_queue.Count > 0) due = Math.Max(due, _queue.Last().Due);
                _queue.Enqueue((due, envelope, enqueue));
                if (_queue.Count == 1) Arm(due);
            }
        }

        private void Arm(long due) => _timer.Change(Math.Max(0, due - Environment.TickCount64), Timeout.Infinite);

        private void Release()
        {
            lock (_queue)
            {
                var now = Environment.TickCount64;
                while (_queue.Count > 0 && _queue.Peek().Due <= now)
                {
                    var (_, envelope, enqueue) = _queue.Dequeue();
                    enqueue(envelope);
                }
                if (_queue.Count > 0) Arm(_queue.Peek().Due);
            }
        }
    }
}

/// <summary>Which VM (actor system and actor path prefix) has which link-fault plan.</summary>
public static class LinkFaultRegistry
{
    private static readonly PathRegistry<LinkFaultPlan> Plans = new();

    public static IDisposable Register(ActorSystem system, string pathPrefix, LinkFaultPlan plan) => Plans.Register(system, pathPrefix, plan);

    public static LinkFaultPlan? PlanFor(ActorSystem system, IActorRef owner) => Plans.Find(system, owner);
}
