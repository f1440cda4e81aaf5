using Akka.Actor;
using Akka.Event;
using static ActorVmm.Memory.SwapperProtocol;

namespace ActorVmm.Memory;

/// <summary>
/// Thin around <see cref="PageAging"/>: a periodic Akka timer (TestKit's virtual scheduler drives
/// it in tests) starts a scan; the vmspace's sample is folded in and the victims are sent back.
/// One scan at a time: Idle --Scan--> Sampling --AccessedSample--> PagingOut --PagedOut--> Idle
/// (Sampling --AccessedSample without victims--> Idle; any --Refused--> Idle).
/// </summary>
internal sealed class SwapperActor : ReceiveActor, IWithTimers
{
    private const string TimerKey = "scan";

    private readonly IActorRef _vmspace;
    private readonly Options _options;
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private PageAging? _aging;
    private long _inFlight; // the id of the outstanding request, 0 = idle
    private long _nextId, _scans, _skipped, _requested, _pagedOut;
    private int _lastVictims;
    private string? _refusal;

    public ITimerScheduler Timers { get; set; } = null!;

    public SwapperActor(IActorRef vmspace, Options options)
    {
        if (options.Interval <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(options), options.Interval, "the scan interval must be positive");
        _vmspace = vmspace;
        _options = options;

        Receive<Scan>(_ =>
        {
            if (_inFlight != 0) { _skipped++; return; }
            _inFlight = ++_nextId;
            _vmspace.Tell(new VmspaceProtocol.SampleAccessed(_inFlight));
        });
        Receive<VmspaceProtocol.AccessedSample>(s =>
        {
            if (s.Id != _inFlight) return; // an answer to an incarnation before a restart
            _aging ??= new PageAging((ulong)s.Pages.Length, _options.ColdScans);
            if (_aging.Pages != (ulong)s.Pages.Length) _aging = new PageAging((ulong)s.Pages.Length, _options.ColdScans);
            _aging.Observe(s.Pages);
            _scans++;
            var victims = _aging.Victims(s.ResidentPages, s.TargetResidentPages);
            _lastVictims = victims.Length;
            if (victims.Length == 0) { _inFlight = 0; return; }
            _requested += victims.Length;
            _vmspace.Tell(new VmspaceProtocol.PageOut(s.Id, victims));
        });
        Receive<VmspaceProtocol.PagedOut>(p =>
        {
            if (p.Id != _inFlight) return;
            _pagedOut += p.Pages;
            _inFlight = 0;
        });
        Receive<VmspaceProtocol.Refused>(r =>
        {
            if (r.Id != _inFlight) return;
            _inFlight = 0;
            if (_refusal is null) _log.Warning("swapper: the vmspace refused a scan: {0}", r.Reason);
            _refusal = r.Reason;
        });
        Receive<GetStats>(_ => Sender.Tell(new Stats(_scans, _skipped, _requested, _pagedOut, _lastVictims, _refusal, _inFlight != 0)));
    }

    protected override void PreStart() =>
        Timers.StartPeriodicTimer(TimerKey, Scan.Instance, _options.Interval);
}
