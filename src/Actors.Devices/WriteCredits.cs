using Akka.Actor;

namespace ActorVmm.Devices;

/// <summary>
/// The receiving side of posted-write flow control (<see cref="DeviceProtocol.WriteWindow"/>):
/// posted writes are counted per sender and returned as one <see cref="DeviceProtocol.WriteCredit"/>
/// every <see cref="DeviceProtocol.CreditBatch"/>; any reply to a sender acknowledges every write it
/// sent before (mailboxes are FIFO), so its count starts again; an actor that restarts returns what
/// it still counts, so no sender's window leaks. Used inside one actor's message handling only.
/// </summary>
public sealed class WriteCredits
{
    private readonly Dictionary<IActorRef, int> _uncredited = new();

    /// <summary>A posted write from <paramref name="sender"/>, counted before the model runs (if the
    /// model throws, <see cref="ReturnAll"/> still credits it).</summary>
    public void Posted(IActorRef sender)
    {
        _uncredited.TryGetValue(sender, out var n);
        if (++n >= DeviceProtocol.CreditBatch)
        {
            sender.Tell(new DeviceProtocol.WriteCredit(n));
            n = 0;
        }
        _uncredited[sender] = n;
    }

    /// <summary>A reply is going to <paramref name="sender"/>: it acknowledges every earlier write.</summary>
    public void Replied(IActorRef sender) => _uncredited.Remove(sender);

    /// <summary>Returns every count now (before a restart forgets them).</summary>
    public void ReturnAll()
    {
        foreach (var (sender, n) in _uncredited)
            if (n > 0) sender.Tell(new DeviceProtocol.WriteCredit(n));
        _uncredited.Clear();
    }
}
