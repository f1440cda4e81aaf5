using Akka.Actor;

namespace ActorVmm.Memory;

/// <summary>
/// The swapper (FreeBSD's pageout daemon, Linux's kswapd): a child of the vmspace
/// that, on a timer, asks the vmspace for an A-bit scan (<see cref="VmspaceProtocol.SampleAccessed"/>),
/// ages the pages in a <see cref="PageAging"/>, and asks the vmspace to swap out the pages not
/// accessed for N scans, plus the least recently accessed ones while residency is above the
/// vmspace's target (<see cref="VmspaceProtocol.PageOut"/>). The vmspace does every page operation
/// (it owns the userfaultfd and the pmap); a fault that would exceed the resident limit still makes
/// room itself (direct reclaim), so the limit holds between scans too.
/// </summary>
public static class SwapperProtocol
{
    public interface ISwapperMessage;

    /// <summary>The timer's message: one scan (skipped while the last one is still in flight).</summary>
    public sealed record Scan : ISwapperMessage { public static readonly Scan Instance = new(); }

    public sealed record GetStats : ISwapperMessage { public static readonly GetStats Instance = new(); }

    /// <param name="Scans">samples folded in</param>
    /// <param name="Skipped">timer ticks that found the previous scan still in flight</param>
    /// <param name="Requested">pages asked to be swapped out</param>
    /// <param name="PagedOut">pages the vmspace swapped out (the rest were touched in between)</param>
    /// <param name="LastVictims">victims of the last scan</param>
    /// <param name="Refusal">why the vmspace refused the last scan; null: it did not</param>
    /// <param name="Busy">a scan is in flight (sampling or paging out): a tick now would be skipped</param>
    public sealed record Stats(long Scans, long Skipped, long Requested, long PagedOut, int LastVictims, string? Refusal, bool Busy) : ISwapperMessage;

    /// <summary>Scans every <paramref name="Interval"/>; a page not accessed for <paramref name="ColdScans"/> scans is swapped out.</summary>
    public sealed record Options(TimeSpan Interval, int ColdScans);

    /// <param name="vmspace">the vmspace to scan (the parent, in a VM)</param>
    /// <param name="options">how often to scan, and after how many scans without a touch a page goes</param>
    public static Props Props(IActorRef vmspace, Options options) =>
        Akka.Actor.Props.Create(() => new SwapperActor(vmspace, options));
}
