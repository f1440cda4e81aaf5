using Akka.Actor;
using ActorVmm.Host.Tracing;

namespace ActorVmm.Host.Control;

/// <summary>`ctl trace`: the recent trace of a VM and a live tail, one line per message.</summary>
public static class TraceProtocol
{
    public interface ITraceMessage;

    /// <summary>One traced message as text (the message's fields are in <see cref="Text"/>).</summary>
    public sealed record TraceLine(long Id, long Parent, long Nanoseconds, string Sender, string Receiver, string Type, string Text)
        : ITraceMessage
    {
        public override string ToString() => TraceRecorder.ToText(new TraceEvent(Id, Parent, Nanoseconds, Sender, Receiver, Text));
    }

    /// <summary>Follow the trace: <see cref="TraceLine"/>s go to <paramref name="Subscriber"/> until
    /// it stops or unsubscribes. <paramref name="Filter"/>: see TraceFilter.Parse.</summary>
    public sealed record Subscribe(IActorRef Subscriber, string Filter) : ITraceMessage;

    public sealed record Subscribed(string Vm) : ITraceMessage;

    public sealed record Unsubscribe(IActorRef Subscriber) : ITraceMessage;

    /// <summary>The latest <paramref name="Count"/> events still in the VM's trace ring.</summary>
    public sealed record GetRecent(int Count, string Filter) : ITraceMessage;

    public sealed record Recent(string Vm, TraceLine[] Lines) : ITraceMessage;

    /// <summary>A request the hub cannot serve (a malformed filter).</summary>
    public sealed record Refused(string Why) : ITraceMessage;

    public static Props Props(string vm, TraceRecorder recorder) => Akka.Actor.Props.Create(() => new TraceHubActor(vm, recorder));

    public static TraceLine Line(TraceEvent e) => new(e.Id, e.ParentId, e.Nanoseconds, e.Sender, e.Receiver, e.Type, e.Message.ToString() ?? e.Type);
}

/// <summary>
/// The trace of one VM offered to `ctl`: the recorder's ring for recent events, and its live
/// hook for followers (installed only while someone follows, so an unwatched VM pays nothing).
/// </summary>
internal sealed class TraceHubActor : ReceiveActor
{
    private sealed record Published(TraceEvent Event);

    private readonly TraceRecorder _recorder;
    private readonly Dictionary<IActorRef, TraceFilter> _followers = new();

    public TraceHubActor(string vm, TraceRecorder recorder)
    {
        _recorder = recorder;
        Receive<TraceProtocol.Subscribe>(s =>
        {
            if (!TryFilter(s.Filter, out var filter)) return;
            _followers[s.Subscriber] = filter;
            Context.Watch(s.Subscriber);
            var self = Self;
            _recorder.Live = e => self.Tell(new Published(e));
            Sender.Tell(new TraceProtocol.Subscribed(vm));
        });
        Receive<TraceProtocol.Unsubscribe>(u => Drop(u.Subscriber));
        Receive<Terminated>(t => Drop(t.ActorRef));
        Receive<Published>(p =>
        {
            TraceProtocol.TraceLine? line = null;
            foreach (var (follower, filter) in _followers)
                if (filter.Matches(p.Event.Sender, p.Event.Receiver, p.Event.Type))
                    follower.Tell(line ??= TraceProtocol.Line(p.Event));
        });
        Receive<TraceProtocol.GetRecent>(r =>
        {
            if (!TryFilter(r.Filter, out var filter)) return;
            var lines = _recorder.Snapshot().Where(e => filter.Matches(e.Sender, e.Receiver, e.Type))
                .TakeLast(Math.Clamp(r.Count, 0, 100_000)).Select(TraceProtocol.Line).ToArray();
            Sender.Tell(new TraceProtocol.Recent(vm, lines));
        });
    }

    private bool TryFilter(string text, out TraceFilter filter)
    {
        try
        {
            filter = TraceFilter.Parse(text);
            return true;
        }
        catch (FormatException e)
        {
            Sender.Tell(new TraceProtocol.Refused(e.Message));
            filter = TraceFilter.All;
            return false;
        }
    }

    private void Drop(IActorRef follower)
    {
        _followers.Remove(follower);
        if (_followers.Count == 0) _recorder.Live = null;
    }

    protected override void PostStop() => _recorder.Live = null;
}
