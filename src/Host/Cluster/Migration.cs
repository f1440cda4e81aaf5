using System.Diagnostics;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using ActorVmm.Host.Snapshot;
using ActorVmm.Host.Vm;
using Serilog;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// Moving a VM to another host node by stop-and-copy (`ctl migrate --vm NAME --to NODE`): the
/// source pauses the VM and snapshots it (<see cref="VmProtocol.TakeSnapshot"/>) into a directory of its
/// own, offers it to the target, and streams the snapshot's files there in chunks through an
/// Akka.Streams StreamRef (back-pressured, each element far under remoting's frame size). The target
/// checks the whole snapshot (<see cref="VmRestore.Open"/>) and says it is ready; only then does the
/// source end its VM and release what it holds (its disk file among them), and tell the target to
/// commit; the target starts the VM from the snapshot. Until the commit the VM exists only on the
/// source, paused, and any failure (a refusal, a timeout, the target's node or actor gone) resumes it
/// there untouched. After the commit the source keeps its copy of the snapshot until the target
/// reports the VM started: if the target answers that it could not start it, or the cluster removes
/// the target's node, the source starts the VM again from that copy. Nothing else (no timeout) does:
/// the target may be starting it, and the VM runs in one place at any time.
/// </summary>
public static class MigrationProtocol
{
    public interface IMigrationMessage;

    /// <summary>How long any one step may take (a snapshot, a start; the transfer without a byte sent)
    /// before the migration is given up.</summary>
    public static readonly TimeSpan StepLimit = TimeSpan.FromMinutes(2);

    /// <summary>Bytes of one chunk: far under remoting's frame size (128 000 bytes).</summary>
    public const int ChunkBytes = 64 * 1024;

    /// <summary>Most files a snapshot offered for a migration may have.</summary>
    public const int MaxFiles = 4096;

    /// <summary>`ctl migrate`, to the VM's node: move VM <paramref name="Name"/> to node
    /// <paramref name="ToNode"/> (HOST:PORT). Answered <see cref="Migrated"/> or <see cref="MigrationFailed"/>,
    /// after <see cref="Progress"/> reports if <paramref name="ReportProgress"/>.</summary>
    /// <param name="MaxDowntime">pre-copy rounds go on until the pages left to send would take no longer
    /// than this to send (<see cref="DefaultMaxDowntime"/> if null)</param>
    /// <param name="StopAndCopy">no pre-copy: pause first, then copy everything</param>
    public sealed record MigrateVm(string Name, string ToNode, bool ReportProgress = false, TimeSpan? MaxDowntime = null,
        bool StopAndCopy = false) : IMigrationMessage;

    /// <summary>The downtime pre-copy aims at when none is given (QEMU's and Cloud Hypervisor's default).</summary>
    public static readonly TimeSpan DefaultMaxDowntime = TimeSpan.FromMilliseconds(300);

    /// <summary>Pre-copy rounds after which the VM is stopped and copied even if the pages written
    /// per round never came under the downtime limit.</summary>
    public const int MaxRounds = 30;

    /// <summary>Where a migration is: at each step, and every <see cref="ProgressInterval"/> of the transfer.</summary>
    /// <param name="Name">the VM</param>
    /// <param name="Step">what it does now</param>
    /// <param name="BytesSent">bytes streamed so far</param>
    /// <param name="BytesToSend">the snapshot's size (its all-zero chunks are not sent, so fewer may be)</param>
    /// <param name="Elapsed">since the request</param>
    /// <param name="Paused">whether the guest is stopped now</param>
    public sealed record Progress(string Name, string Step, long BytesSent, long BytesToSend, TimeSpan Elapsed, bool Paused) : IMigrationMessage
    {
        /// <summary>The pre-copy round (1: all of memory); 0 without pre-copy.</summary>
        public int Round { get; init; }

        /// <summary>RAM pages sent so far, in all rounds.</summary>
        public long PagesSent { get; init; }

        /// <summary>Pages the guest wrote per second during the last round.</summary>
        public long DirtyPagesPerSecond { get; init; }

        /// <summary>The transfer's rate in the last round.</summary>
        public long BytesPerSecond { get; init; }

        /// <summary>How long sending the pages written in the last round would keep the guest stopped.</summary>
        public TimeSpan? ExpectedDowntime { get; init; }

        /// <summary>The line `ctl migrate` prints.</summary>
        public override string ToString() =>
            $"{Elapsed.TotalSeconds,6:0.0} s  {Step,-40} {BytesSent >> 10,8} KiB of {BytesToSend >> 10} KiB" +
            (Round > 0 ? $", {PagesSent} pages" : "") +
            (BytesPerSecond > 0 ? $", {BytesPerSecond * 8 / 1e6:0} Mbit/s" : "") +
            (ExpectedDowntime is { } d ? $", {DirtyPagesPerSecond} pages written/s, expected downtime {d.TotalMilliseconds:0} ms" : "") +
            (Paused ? "  (guest stopped)" : "");
    }

    public static readonly TimeSpan ProgressInterval = TimeSpan.FromSeconds(1);

    /// <summary>A migration done: to ctl, and to the target's node actor, which keeps it with the VM.</summary>
    /// <param name="Name">the VM</param>
    /// <param name="From">the node it ran on (HOST:PORT)</param>
    /// <param name="To">the node it runs on now</param>
    /// <param name="Bytes">bytes streamed (the snapshot's files without their all-zero chunks)</param>
    /// <param name="Downtime">from the guest's pause on the source to its start on the target</param>
    /// <param name="Total">from the request to the start on the target</param>
    public sealed record Migrated(string Name, string From, string To, long Bytes, TimeSpan Downtime, TimeSpan Total) : IMigrationMessage
    {
        /// <summary>Pre-copy rounds run while the guest ran (0: stop-and-copy).</summary>
        public int Rounds { get; init; }

        /// <summary>How it was done: "pre-copy", or "stop-and-copy" and why.</summary>
        public string Mode { get; init; } = "stop-and-copy";

        /// <summary>RAM pages sent after the guest stopped.</summary>
        public long PagesWhileStopped { get; init; }

        public override string ToString() =>
            $"{Name} migrated from {From} to {To} by {Mode}{(Rounds > 0 ? $" ({Rounds} round{(Rounds == 1 ? "" : "s")}, {PagesWhileStopped} pages after the stop)" : "")}: " +
            $"{Bytes >> 10} KiB sent, guest stopped {Downtime.TotalMilliseconds:0} ms, {Total.TotalMilliseconds:0} ms in all";
    }

    /// <param name="Name">the VM</param>
    /// <param name="Why">what failed, and what that left</param>
    /// <param name="RunsOn">the node the VM runs on now (the source's), or "" if it runs nowhere</param>
    public sealed record MigrationFailed(string Name, string Why, string RunsOn) : IMigrationMessage;

    /// <summary>One file of a snapshot offered: a plain file name and its length.</summary>
    public sealed record OfferedFile(string Name, long Length);

    /// <summary>From the source's migration actor to the target node's node actor. Answered by the target's
    /// migration actor with <see cref="Accepted"/>, or <see cref="Refused"/>.</summary>
    /// <param name="Name">the VM, under the same name on the target</param>
    /// <param name="Files">the snapshot's files, the manifest last</param>
    /// <param name="Settings">the VM's settings, for what the target's host does with it (serial output, trace);
    /// the machine itself is the snapshot's</param>
    /// <param name="Console">the VM's console so far, for the target's console hub to go on from</param>
    public sealed record Offer(string Name, NodeProtocol.Setting[] Settings, OfferedFile[] Files, ConsoleProtocol.State Console) : IMigrationMessage
    {
        /// <summary>
        /// Pre-copy: <see cref="Files"/> is the memory file alone (<see cref="MemoryFile"/>), sent in rounds,
        /// one StreamRef each, each answered <see cref="RoundReceived"/>; then the source sends the whole
        /// snapshot's offer to the same target actor, the memory file in it at the same length, and
        /// streams only the memory pages written since the last round.
        /// </summary>
        public bool Precopy { get; init; }
    }

    /// <summary>The file of the memory part in a snapshot directory.</summary>
    public static readonly string MemoryFile = SnapshotWriter.FileOf(SnapshotParts.Memory);

    /// <summary>The target wrote every chunk of pre-copy round <paramref name="Round"/>.</summary>
    public sealed record RoundReceived(string Name, int Round) : IMigrationMessage;

    public sealed record Accepted(string Name) : IMigrationMessage;

    public sealed record Refused(string Name, string Why) : IMigrationMessage;

    /// <summary>Bytes at <paramref name="Offset"/> of offered file <paramref name="File"/> (an index in
    /// <see cref="Offer.Files"/>); the bytes of a file no chunk covers are zeroes.</summary>
    public sealed record Chunk(int File, long Offset, byte[] Bytes) : IMigrationMessage;

    /// <summary>The target has every file and the snapshot passed its checks.</summary>
    public sealed record Ready(string Name) : IMigrationMessage;

    /// <summary>The source's VM has ended and released what it held: start it on the target.</summary>
    public sealed record Commit(string Name) : IMigrationMessage;

    /// <summary>The VM runs on the target, its console at <paramref name="Console"/>.</summary>
    public sealed record Started(string Name, string Node, IActorRef Console) : IMigrationMessage;

    /// <summary>The source gives the migration up before the commit: the target drops what it received.</summary>
    public sealed record Abort(string Name, string Why) : IMigrationMessage;

    /// <summary>A directory for a snapshot on this host: under the system's temporary directory.</summary>
    internal static string NewDirectory(string kind, string vm) =>
        Path.Combine(Path.GetTempPath(), $"actorvmm-{kind}-{vm}-{Guid.NewGuid():N}");

    internal static void DeleteQuietly(string directory)
    {
        try
        {
            if (Directory.Exists(directory)) Directory.Delete(directory, recursive: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Log.Warning("cannot remove {Directory}: {Reason}", directory, e.Message);
        }
    }

    /// <summary>The files of snapshot directory <paramref name="directory"/>, the manifest last.</summary>
    internal static OfferedFile[] FilesOf(string directory) =>
        Directory.GetFiles(directory).Select(f => new FileInfo(f))
            .OrderBy(f => f.Name == SnapshotDirectory.ManifestFile).ThenBy(f => f.Name, StringComparer.Ordinal)
            .Select(f => new OfferedFile(f.Name, f.Length)).ToArray();

    /// <summary>The chunks of <paramref name="files"/> in <paramref name="directory"/>, in order, read as the
    /// stream asks for them; a chunk of zeroes only is left out (the target's file reads zeroes there).</summary>
    internal static IEnumerable<Chunk> Chunks(string directory, OfferedFile[] files)
    {
        for (var i = 0; i < files.Length; i++)
        {
            using var file = File.OpenHandle(Path.Combine(directory, files[i].Name));
            for (var offset = 0L; offset < files[i].Length; offset += ChunkBytes)
            {
                var bytes = new byte[(int)Math.Min(ChunkBytes, files[i].Length - offset)];
                var n = 0;
                while (n < bytes.Length)
                {
                    var r = RandomAccess.Read(file, bytes.AsSpan(n), offset + n);
                    if (r == 0) throw new IOException($"{files[i].Name} became shorter while it was sent");
                    n += r;
                }
                if (bytes.AsSpan().IndexOfAnyExcept((byte)0) < 0) continue;
                yield return new Chunk(i, offset, bytes);
            }
        }
    }

    /// <summary>Chunks of memory file <paramref name="path"/> (offered as file <paramref name="file"/>) that
    /// hold RAM pages <paramref name="pages"/> (ascending), runs of at most <see cref="ChunkBytes"/>, every
    /// one sent, zeroes too: each replaces what the target holds there.</summary>
    internal static IEnumerable<Chunk> PageChunks(string path, int file, IReadOnlyList<ulong> pages)
    {
        const int page = 4096;
        const int runPages = ChunkBytes / page;
        using var handle = File.OpenHandle(path);
        var i = 0;
        while (i < pages.Count)
        {
            var first = pages[i];
            var n = 1;
            while (n < runPages && i + n < pages.Count && pages[i + n] == first + (ulong)n) n++;
            var bytes = new byte[n * page];
            var offset = (long)first * page;
            var done = 0;
            while (done < bytes.Length)
            {
                var r = RandomAccess.Read(handle, bytes.AsSpan(done), offset + done);
                if (r == 0) throw new IOException($"{Path.GetFileName(path)} is shorter than its page {first + (ulong)(done / page)}");
                done += r;
            }
            yield return new Chunk(file, offset, bytes);
            i += n;
        }
    }

    /// <summary>Why <paramref name="offer"/> cannot be received as it is, or null: every file a plain,
    /// distinct name of this directory with a sane length, the manifest among them.</summary>
    internal static string? CheckOffer(Offer offer)
    {
        if (offer.Files is not { Length: > 0 and <= MaxFiles }) return $"a snapshot of 1 to {MaxFiles} files is expected";
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var f in offer.Files)
        {
            if (f is null || string.IsNullOrEmpty(f.Name) || f.Name is "." or ".." || f.Name.IndexOfAny(['/', '\0']) >= 0 || f.Name.Length > 255)
                return $"\"{f?.Name}\" is not a file name of a snapshot";
            if (!names.Add(f.Name)) return $"file {f.Name} is offered twice";
            if (f.Length < 0) return $"file {f.Name} has a negative length";
        }
        if (offer.Precopy)
        {
            if (offer.Files.Length != 1 || offer.Files[0].Name != MemoryFile || offer.Files[0].Length % 4096 != 0)
                return $"a pre-copy offers one file, {MemoryFile}, of whole pages";
        }
        else if (!names.Contains(SnapshotDirectory.ManifestFile)) return $"the snapshot has no {SnapshotDirectory.ManifestFile}";
        if (offer.Console is null || offer.Console.Kept is null || offer.Console.Written < offer.Console.Kept.Length)
            return "the console's state is not consistent";
        return null;
    }
}

/// <summary>
/// The source side of one migration, a child of the source's node actor: pause and snapshot, offer,
/// stream, then (on Ready) ask the node actor to end and release the VM, commit, and wait for the
/// start. See <see cref="MigrationProtocol"/> for what each failure leaves.
/// </summary>
internal sealed class MigrationSource : ReceiveActor, IWithTimers
{
    /// <summary>What the source's node actor gives the migration.</summary>
    internal sealed record Job(string Name, IActorRef Vm, IActorRef Console, Action FlushConsole, NodeProtocol.Setting[] Settings,
        Address Target, string TargetNode, string SourceNode, IActorRef ReplyTo, bool ReportProgress = false,
        TimeSpan? MaxDowntime = null, bool StopAndCopy = false);

    /// <summary>To the node actor: the target is ready; end the VM and tell <see cref="Released"/> once
    /// its resources are released.</summary>
    internal sealed record EndForMove(string Name, string To);

    internal sealed record Released(string Name);

    /// <summary>To the node actor: the VM runs on the target: forget it here (its hub follows the target's).</summary>
    internal sealed record Moved(string Name, string To, IActorRef Console);

    /// <summary>To the node actor: the target could not start the VM after the commit: start it here again
    /// from <paramref name="Directory"/> (the source's snapshot), answered <see cref="RestartedHere"/>.</summary>
    internal sealed record RestartHere(string Name, NodeProtocol.Setting[] Settings, string Directory, IActorRef Console);

    internal sealed record RestartedHere(string Name, string? Error);

    private sealed record StepTimeout(string Step);

    private sealed record ReportTick
    {
        public static readonly ReportTick Instance = new();
    }

    private sealed record StreamReady(ISourceRef<MigrationProtocol.Chunk> Ref);

    private sealed record StreamFailed(string Why);

    private const long PageBytes = 4096;

    private readonly Job _job;
    private readonly string _directory;
    private readonly string _precopyDirectory;
    private readonly string _memoryFile;
    private readonly TimeSpan _maxDowntime;
    private readonly Stopwatch _total = Stopwatch.StartNew();
    private readonly Stopwatch _down = new();
    private MigrationProtocol.OfferedFile[] _files = [];
    private IActorRef _target = ActorRefs.Nobody;
    private long _bytes;
    private long _toSend;
    private bool _committed;

    // Pre-copy: the round under way, how it went, and the pages copied but not sent when the guest stopped.
    private string _mode = "pre-copy";
    private bool _precopy;
    private bool _tracking;
    private int _round;
    private long _pagesSent;
    private long _roundBytesAtStart;
    private long _firstChunkAt;     // Stopwatch timestamp of the round's first chunk pulled, 0 before it
    private int _lastRoundPages;
    private TimeSpan _lastCopy;
    private long _bytesPerSecond, _dirtyPerSecond;
    private TimeSpan? _expectedDowntime;
    private IReadOnlyList<ulong> _unsent = [];
    private IReadOnlyList<ulong> _finalPages = [];

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(Job job) => Akka.Actor.Props.Create(() => new MigrationSource(job));

    public MigrationSource(Job job)
    {
        _job = job;
        _directory = MigrationProtocol.NewDirectory("outgoing", job.Name);
        // A directory of its own, removed whole at the end: a copy still being written then goes with it.
        _precopyDirectory = MigrationProtocol.NewDirectory("precopy", job.Name);
        _memoryFile = Path.Combine(_precopyDirectory, MigrationProtocol.MemoryFile);
        _maxDowntime = job.MaxDowntime ?? MigrationProtocol.DefaultMaxDowntime;
        if (job.StopAndCopy)
        {
            _mode = "stop-and-copy";
            Snapshotting();
        }
        else StartingPrecopy();
    }

    protected override void PreStart()
    {
        // The target's node unreachable before the commit, or removed after it: the migration's end there is lost.
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember), typeof(Akka.Cluster.ClusterEvent.MemberRemoved));
        if (_job.StopAndCopy) StopAndSnapshot();
        else
        {
            _job.Vm.Tell(new VmProtocol.TrackMemoryWrites(true));
            Step("tracking the guest's writes");
        }
    }

    private void Step(string what)
    {
        Timers.StartSingleTimer("step", new StepTimeout(what), MigrationProtocol.StepLimit);
        _step = what;
        Report();
    }

    private string _step = "";
    private long _bytesAtLastTick;
    private bool _transferring;

    private void Report()
    {
        if (_job.ReportProgress)
            _job.ReplyTo.Tell(new MigrationProtocol.Progress(_job.Name, _step, Interlocked.Read(ref _bytes), _toSend, _total.Elapsed, _down.IsRunning)
            {
                Round = _round,
                PagesSent = Interlocked.Read(ref _pagesSent),
                DirtyPagesPerSecond = _dirtyPerSecond,
                BytesPerSecond = _bytesPerSecond,
                ExpectedDowntime = _expectedDowntime,
            });
    }

    // ------------------------------------------------------------------ pre-copy

    private void StartingPrecopy()
    {
        Receive<Memory.VmspaceProtocol.WritesTracked>(t =>
        {
            if (t.Error is { } why)
            {
                // Not an error: the VM moves all the same, with the guest stopped for all of it.
                _mode = $"stop-and-copy (no pre-copy: {why})";
                Log.Information("migration of {Name}: {Mode}", _job.Name, _mode);
                Step($"no pre-copy: {why}");
                Become(Snapshotting);
                StopAndSnapshot();
                return;
            }
            _precopy = _tracking = true;
            _round = 1;
            try { Directory.CreateDirectory(_precopyDirectory); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                GiveUp($"cannot make {_precopyDirectory}: {e.Message}");
                return;
            }
            _job.Vm.Tell(new VmProtocol.CopyMemory(_memoryFile, WrittenOnly: false));
            _lastCopy = _total.Elapsed;
            Step("round 1: copying guest memory");
            Become(Copying);
        });
        Common();
    }

    private void Copying()
    {
        Receive<Memory.VmspaceProtocol.MemorySaved>(m =>
        {
            if (m.Error is { } error)
            {
                GiveUp($"copying guest memory failed: {error}");
                return;
            }
            if (_round == 1)
            {
                var offer = new MigrationProtocol.Offer(_job.Name, _job.Settings, [new MigrationProtocol.OfferedFile(MigrationProtocol.MemoryFile, m.Bytes)],
                    new ConsoleProtocol.State(0, [])) { Precopy = true };
                Context.ActorSelection(new RootActorPath(_job.Target) / "user" / Control.ControlProtocol.DirectoryName).Tell(offer);
                Step("the target's answer to the offer");
                Become(OfferingPrecopy);
                return;
            }
            var pages = m.Written ?? [];
            var since = _total.Elapsed - _lastCopy;
            _lastCopy = _total.Elapsed;
            _dirtyPerSecond = (long)(pages.Length / Math.Max(since.TotalSeconds, 1e-3));
            _expectedDowntime = TimeSpan.FromSeconds(pages.Length * PageBytes / (double)Math.Max(_bytesPerSecond, 1));
            // Rounds go on while they help: until the pages left fit the downtime limit, unless the pages
            // written per round stop shrinking (from the third round on) or there were too many rounds.
            var stalled = _round >= 3 && pages.Length * 10L >= _lastRoundPages * 9L;
            if (_expectedDowntime <= _maxDowntime || stalled || _round > MigrationProtocol.MaxRounds)
            {
                if (_expectedDowntime > _maxDowntime)
                    _mode = $"pre-copy (the guest wrote too fast for {_maxDowntime.TotalMilliseconds:0} ms of downtime: " +
                            (stalled ? "the pages written per round stopped shrinking)" : $"{MigrationProtocol.MaxRounds} rounds)");
                _round--; // the pages of this copy go with the stop
                _unsent = pages;
                StopAndSnapshot();
                Become(Snapshotting);
                return;
            }
            _lastRoundPages = pages.Length;
            SendRound(pages);
        });
        Common();
    }

    private void OfferingPrecopy()
    {
        Receive<MigrationProtocol.Accepted>(_ =>
        {
            _target = Sender;
            Context.Watch(_target);
            Timers.StartPeriodicTimer("report", ReportTick.Instance, MigrationProtocol.ProgressInterval);
            SendRound(null);
        });
        Receive<MigrationProtocol.Refused>(r => GiveUp($"{_job.TargetNode} refused it: {r.Why}"));
        Common();
    }

    /// <summary>Streams round <see cref="_round"/>: every page of the memory file that is not all zeroes
    /// (round 1, <paramref name="pages"/> null), else exactly <paramref name="pages"/>.</summary>
    private void SendRound(IReadOnlyList<ulong>? pages)
    {
        var path = _memoryFile;
        var chunks = pages is null
            ? MigrationProtocol.Chunks(Path.GetDirectoryName(path)!, [new MigrationProtocol.OfferedFile(Path.GetFileName(path), new FileInfo(path).Length)])
            : MigrationProtocol.PageChunks(path, 0, pages);
        _toSend += pages is null ? new FileInfo(path).Length : pages.Count * PageBytes;
        _roundBytesAtStart = Interlocked.Read(ref _bytes);
        Interlocked.Exchange(ref _firstChunkAt, 0);
        Stream(chunks);
        Step(pages is null ? "round 1: sending guest memory" : $"round {_round}: sending {pages.Count} pages");
        Become(SendingRound);
    }

    private void SendingRound()
    {
        Receive<StreamReady>(r => _target.Tell(r.Ref));
        Receive<StreamFailed>(f => GiveUp($"the transfer could not start: {f.Why}"));
        Receive<MigrationProtocol.RoundReceived>(r =>
        {
            if (r.Round != _round) return;
            _transferring = false;
            // The link's rate: the best round's, each timed from its first chunk (a StreamRef's setup is
            // not the transfer, and would make small rounds look slow).
            var from = Interlocked.Read(ref _firstChunkAt);
            var took = from == 0 ? TimeSpan.Zero : Stopwatch.GetElapsedTime(from);
            var bytes = Interlocked.Read(ref _bytes) - _roundBytesAtStart;
            if (bytes > 0) _bytesPerSecond = Math.Max(_bytesPerSecond, (long)(bytes / Math.Max(took.TotalSeconds, 1e-3)));
            _round++;
            _job.Vm.Tell(new VmProtocol.CopyMemory(_memoryFile, WrittenOnly: true));
            Step($"round {_round}: copying the pages written");
            Become(Copying);
        });
        Receive<MigrationProtocol.Refused>(r => GiveUp($"{_job.TargetNode} refused it: {r.Why}"));
        Common();
    }

    /// <summary>Runs <paramref name="chunks"/> into a StreamRef for the target, counting what it sends.</summary>
    private void Stream(IEnumerable<MigrationProtocol.Chunk> chunks)
    {
        // Rounds stream the memory file alone; the snapshot's stream has it among the others.
        var round = _files.Length == 0;
        var memoryIndex = Array.FindIndex(_files, f => f.Name == MigrationProtocol.MemoryFile);
        var counted = Source.From(chunks)
            .Select(c =>
            {
                Interlocked.Add(ref _bytes, c.Bytes.Length);
                Interlocked.CompareExchange(ref _firstChunkAt, Stopwatch.GetTimestamp(), 0);
                if (round || c.File == memoryIndex) Interlocked.Add(ref _pagesSent, c.Bytes.Length / PageBytes);
                return c;
            })
            .WithAttributes(ActorAttributes.CreateDispatcher("akka.stream.default-blocking-io-dispatcher"));
        counted.RunWith(StreamRefs.SourceRef<MigrationProtocol.Chunk>(), Context.Materializer())
            .ContinueWith(t => t.IsCompletedSuccessfully ? new StreamReady(t.Result) : (object)new StreamFailed(t.Exception?.GetBaseException().Message ?? "cancelled"))
            .PipeTo(Self);
        _transferring = true;
    }

    // ------------------------------------------------------------------ the stop, and the snapshot

    private void StopAndSnapshot()
    {
        _down.Start();
        _snapshotPending = true;
        _job.Vm.Tell(VmProtocol.Pause.Instance);
        _job.Vm.Tell(SnapshotRequest());
        Step("the snapshot");
    }

    private VmProtocol.TakeSnapshot SnapshotRequest() =>
        new(_directory, PrecopiedMemory: _precopy ? _memoryFile : null, WriteLog: _precopy ? Memory.VmspaceProtocol.WriteLogs.Migration : null);

    private sealed record SnapshotAgain
    {
        public static readonly SnapshotAgain Instance = new();
    }

    private void Snapshotting()
    {
        Receive<VmProtocol.SnapshotTaken>(t =>
        {
            _snapshotPending = false;
            if (_failedWhileSnapshotting is { } failed)
            {
                GiveUp(failed);
                return;
            }
            if (_precopy) _finalPages = _unsent.Concat(t.WrittenPages ?? []).Distinct().Order().ToArray();
            _job.FlushConsole();
            _job.Console.Tell(ConsoleProtocol.GetState.Instance);
            Step("the console's state");
        });
        Receive<VmProtocol.SnapshotFailed>(f =>
        {
            if (f.Busy && _failedWhileSnapshotting is null)
            {
                // Another snapshot of the VM (a checkpoint) is being taken: ask again shortly (within the step's limit).
                Timers.StartSingleTimer("again", SnapshotAgain.Instance, TimeSpan.FromMilliseconds(100));
                return;
            }
            _snapshotPending = false;
            GiveUp(_failedWhileSnapshotting ?? $"the snapshot failed: {f.Reason}");
        });
        Receive<SnapshotAgain>(_ =>
        {
            if (_failedWhileSnapshotting is not null)
            {
                _snapshotPending = false;
                GiveUp(_failedWhileSnapshotting);
                return;
            }
            _job.Vm.Tell(VmProtocol.Pause.Instance);
            _job.Vm.Tell(SnapshotRequest());
        });
        Receive<ConsoleProtocol.State>(state =>
        {
            try { _files = MigrationProtocol.FilesOf(_directory); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                GiveUp($"cannot read the snapshot: {e.Message}");
                return;
            }
            var offer = new MigrationProtocol.Offer(_job.Name, _job.Settings, _files, state);
            // After a pre-copy the same target actor, which holds the memory file, takes the whole snapshot.
            if (_precopy) _target.Tell(offer);
            else Context.ActorSelection(new RootActorPath(_job.Target) / "user" / Control.ControlProtocol.DirectoryName).Tell(offer);
            Step("the target's answer to the offer");
            Become(Offering);
        });
        Common();
    }

    private void Offering()
    {
        Receive<MigrationProtocol.Accepted>(_ =>
        {
            if (_target.IsNobody())
            {
                _target = Sender;
                Context.Watch(_target);
            }
            var files = _files;
            var directory = _directory;
            var precopy = _precopy;
            var pages = _finalPages;
            var memory = Array.FindIndex(files, f => f.Name == MigrationProtocol.MemoryFile);
            if (precopy && memory < 0)
            {
                GiveUp("the snapshot has no memory file");
                return;
            }
            // After a pre-copy, only the memory pages written since the last round; the other files whole.
            var chunks = precopy
                ? MigrationProtocol.PageChunks(Path.Combine(directory, files[memory].Name), memory, pages)
                    .Concat(MigrationProtocol.Chunks(directory, files).Where(c => c.File != memory))
                : MigrationProtocol.Chunks(directory, files);
            _toSend += precopy ? files.Where((_, i) => i != memory).Sum(f => f.Length) + pages.Count * PageBytes : files.Sum(f => f.Length);
            Stream(chunks);
            Step("the transfer");
            // Reports (if asked for) and the transfer's watchdog: its step limit counts from the last byte sent.
            Timers.StartPeriodicTimer("report", ReportTick.Instance, MigrationProtocol.ProgressInterval);
            Become(Sending);
        });
        Receive<MigrationProtocol.Refused>(r => GiveUp($"{_job.TargetNode} refused it: {r.Why}"));
        Common();
    }

    private void Sending()
    {
        Receive<StreamReady>(r => _target.Tell(r.Ref));
        Receive<StreamFailed>(f => GiveUp($"the transfer could not start: {f.Why}"));
        Receive<MigrationProtocol.Ready>(_ =>
        {
            Timers.Cancel("report");
            _transferring = false;
            _ending = true;
            Context.Parent.Tell(new EndForMove(_job.Name, _job.TargetNode));
            Step("the release of the VM here");
            Become(Releasing);
        });
        Receive<MigrationProtocol.Refused>(r => GiveUp($"{_job.TargetNode} refused it: {r.Why}"));
        Common();
    }

    private void Releasing()
    {
        Receive<Released>(_ =>
        {
            if (_failedWhileEnding is { } why)
            {
                // The VM has ended here and the target may be gone: no commit; start it here again instead.
                _target.Tell(new MigrationProtocol.Abort(_job.Name, why));
                _committed = true;
                Become(Committed);
                StartHereAgain(why);
                return;
            }
            _committed = true;
            _target.Tell(new MigrationProtocol.Commit(_job.Name));
            Step("the start on the target");
            Become(Committed);
        });
        Receive<MigrationProtocol.Refused>(r =>
        {
            if (!Sender.Equals(Context.Parent)) return; // too late: the VM is ending here, and the commit tells the target to go on
            // The VM ended here by itself (stopped) before the move: there is nothing to move.
            _target.Tell(new MigrationProtocol.Abort(_job.Name, r.Why));
            _job.ReplyTo.Tell(new MigrationProtocol.MigrationFailed(_job.Name, r.Why, ""));
            Context.Stop(Self);
        });
        Common();
    }

    private void Committed()
    {
        Receive<MigrationProtocol.Started>(s =>
        {
            _down.Stop();
            Context.Parent.Tell(new Moved(_job.Name, s.Node, s.Console));
            var migrated = new MigrationProtocol.Migrated(_job.Name, _job.SourceNode, s.Node, Interlocked.Read(ref _bytes), _down.Elapsed, _total.Elapsed)
            {
                Rounds = _precopy ? _round : 0,
                Mode = _mode,
                PagesWhileStopped = _finalPages.Count,
            };
            Sender.Tell(migrated); // the target's node actor: for the VM's `ctl stats`
            if (!_toldUnknown) _job.ReplyTo.Tell(migrated);
            Log.Information("VM {Name} migrated to {Node}: {Bytes} bytes, {Downtime} ms down", _job.Name, s.Node, _bytes, _down.ElapsedMilliseconds);
            Context.Stop(Self);
        });
        Receive<MigrationProtocol.Refused>(r => StartHereAgain($"{_job.TargetNode} could not start it: {r.Why}"));
        Receive<RestartedHere>(r =>
        {
            if (!_toldUnknown) _job.ReplyTo.Tell(r.Error is null
                ? new MigrationProtocol.MigrationFailed(_job.Name, $"{_pendingWhy}; it runs on {_job.SourceNode} again, from the snapshot", _job.SourceNode)
                : new MigrationProtocol.MigrationFailed(_job.Name, $"{_pendingWhy}; starting it again here failed too: {r.Error}", ""));
            Context.Stop(Self); // the directory is the node actor's now (the restarted VM reads its memory from it)
        });
        Common();
    }

    private string _pendingWhy = "";
    private bool _toldUnknown;

    private void StartHereAgain(string why)
    {
        if (_pendingWhy.Length > 0) return;
        _pendingWhy = why;
        Timers.Cancel("step");
        Log.Warning("migration of {Name}: {Why}; starting it here again", _job.Name, why);
        _handedOver = true;
        Context.Parent.Tell(new RestartHere(_job.Name, _job.Settings, _directory, _job.Console));
    }

    private void Common()
    {
        Receive<StepTimeout>(t =>
        {
            if (!_committed)
            {
                _snapshotPending = false; // a snapshot that does not answer is not waited for any longer
                GiveUp(_failedWhileSnapshotting ?? $"{t.Step} took longer than {MigrationProtocol.StepLimit.TotalSeconds:0} s");
                return;
            }
            // After the commit the target may be starting the VM: starting it here too could make two.
            // Only the target's answer or its node's removal decides; ctl hears that it is not known yet.
            if (_pendingWhy.Length > 0 || _toldUnknown) return;
            _toldUnknown = true;
            _job.ReplyTo.Tell(new MigrationProtocol.MigrationFailed(_job.Name,
                $"{_job.TargetNode} has not said within {MigrationProtocol.StepLimit.TotalSeconds:0} s whether it started the VM; " +
                "it runs there if it did, or here again once that node is removed from the cluster (ctl list shows where)", ""));
        });
        Receive<Terminated>(t =>
        {
            // The target's actor stops once it hands the VM to its node actor at the commit: after
            // the commit its end says nothing (its node actor answers).
            if (t.ActorRef.Equals(_target) && !_committed)
                GiveUp($"the migration's end on {_job.TargetNode} went away (its node left or stopped)");
        });
        // Before the commit the target cannot start the VM without it, so a target that may be dead is
        // enough to give up; after it, only one the cluster removed is surely not running it.
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(u =>
        {
            if (u.Member.Address == _job.Target && !_committed) GiveUp($"{_job.TargetNode} became unreachable");
        });
        Receive<Akka.Cluster.ClusterEvent.MemberRemoved>(r =>
        {
            if (r.Member.Address != _job.Target) return;
            if (_committed) StartHereAgain($"{_job.TargetNode} left the cluster before it started the VM");
            else GiveUp($"{_job.TargetNode} left the cluster");
        });
        Receive<ReportTick>(_ =>
        {
            var sent = Interlocked.Read(ref _bytes);
            if (_transferring && sent != _bytesAtLastTick)
                Timers.StartSingleTimer("step", new StepTimeout(_step), MigrationProtocol.StepLimit);
            _bytesAtLastTick = sent;
            Report();
        });
        Receive<VmProtocol.SnapshotTaken>(_ => { });
        Receive<StreamReady>(_ => { });
        Receive<StreamFailed>(_ => { });
    }

    private bool _ending;
    private string? _failedWhileEnding;
    private bool _snapshotPending;
    private string? _failedWhileSnapshotting;

    /// <summary>Before the commit: the VM resumes here as it was, the target drops what it has. While the
    /// VM is ending here for the move, the failure is kept for <see cref="Released"/>.</summary>
    private void GiveUp(string why)
    {
        if (_ending)
        {
            _failedWhileEnding ??= why;
            return;
        }
        if (_snapshotPending)
        {
            // Resume it once the snapshot is done (the VM would resume it after the snapshot anyway; the
            // snapshot's answer also tells whether there is anything to resume).
            _failedWhileSnapshotting ??= why;
            return;
        }
        if (_tracking) _job.Vm.Tell(new VmProtocol.TrackMemoryWrites(false));
        if (_down.IsRunning) _job.Vm.Tell(VmProtocol.Resume.Instance);
        _job.Vm.Tell(new VmProtocol.RecordMigration($"to {_job.TargetNode} failed after {_total.Elapsed.TotalMilliseconds:0} ms: {why}"));
        if (!_target.IsNobody()) _target.Tell(new MigrationProtocol.Abort(_job.Name, why));
        _job.ReplyTo.Tell(new MigrationProtocol.MigrationFailed(_job.Name, $"{why}; it goes on running on {_job.SourceNode}", _job.SourceNode));
        Log.Warning("migration of {Name} to {Node} given up: {Why}", _job.Name, _job.TargetNode, why);
        Context.Stop(Self);
    }

    private bool _handedOver;

    protected override void PostStop()
    {
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
        if (!_handedOver) MigrationProtocol.DeleteQuietly(_directory);
        MigrationProtocol.DeleteQuietly(_precopyDirectory); // its memory file was moved into the snapshot if one was taken
    }
}

/// <summary>
/// The target side of one migration, a child of the target's node actor: receives the files into a
/// directory of its own, checks the snapshot, says Ready, and on the commit has its node actor start
/// the VM from it (<see cref="StartMigrated"/>). Gone before the commit (the source gave up, its
/// node went away, the time ran out), it removes what it received.
/// </summary>
internal sealed class MigrationTarget : ReceiveActor, IWithTimers
{
    /// <summary>To the node actor: start VM <paramref name="Name"/> from the snapshot in
    /// <paramref name="Directory"/>; the node actor tells <paramref name="Source"/>
    /// <see cref="MigrationProtocol.Started"/> or <see cref="MigrationProtocol.Refused"/>, and owns the
    /// directory from then on (removed when the VM ends).</summary>
    internal sealed record StartMigrated(string Name, NodeProtocol.Setting[] Settings, VmRestore Restore, string Directory,
        ConsoleProtocol.State Console, IActorRef Source);

    private sealed record Received(VmRestore? Restore, string? Error);

    private sealed record StepTimeout(string Step);

    private MigrationProtocol.Offer _offer;
    private readonly IActorRef _source;
    private readonly string _directory;
    private VmRestore? _restore;
    private IncomingFiles? _files;
    private IncomingFiles? _precopied;
    private int _round;
    private bool _handedOver;

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(MigrationProtocol.Offer offer, IActorRef source) =>
        Akka.Actor.Props.Create(() => new MigrationTarget(offer, source));

    private sealed record RoundWritten(int Round, string? Error);

    public MigrationTarget(MigrationProtocol.Offer offer, IActorRef source)
    {
        _offer = offer;
        _source = source;
        _directory = MigrationProtocol.NewDirectory("incoming", offer.Name);
        if (offer.Precopy) Precopying();
        else Receiving();
    }

    /// <summary>Pre-copy rounds into the memory file, one StreamRef each, until the snapshot's offer.</summary>
    private void Precopying()
    {
        Receive<ISourceRef<MigrationProtocol.Chunk>>(r =>
        {
            if (_files is null)
            {
                try { _files = new IncomingFiles(_directory, _offer.Files); }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    Refuse($"cannot make the memory file here: {e.Message}");
                    return;
                }
            }
            var files = _files;
            var round = ++_round;
            r.Source.RunForeach(files.Write, Context.Materializer())
                .ContinueWith(t => new RoundWritten(round, t.IsCompletedSuccessfully ? null
                    : $"round {round} of the transfer failed: {t.Exception?.GetBaseException().Message ?? "cancelled"}"))
                .PipeTo(Self);
            Become(WritingRound);
        });
        Receive<MigrationProtocol.Offer>(o =>
        {
            if (!Sender.Equals(_source)) return;
            if (_files is null)
            {
                Refuse("the snapshot came before any memory");
                return;
            }
            var memory = Array.Find(o.Files ?? [], f => f?.Name == MigrationProtocol.MemoryFile);
            var refusal = o.Name != _offer.Name ? $"the snapshot is of {o.Name}, not {_offer.Name}"
                : o.Precopy ? "a second pre-copy offer"
                : MigrationProtocol.CheckOffer(o)
                  ?? (memory is null || memory.Length != _offer.Files[0].Length
                      ? $"the snapshot's {MigrationProtocol.MemoryFile} is not the {_offer.Files[0].Length} bytes copied ahead" : null);
            if (refusal is not null)
            {
                Refuse(refusal);
                return;
            }
            _precopied = _files;
            _files = null;
            _offer = o with { Precopy = false };
            Become(Receiving);
            ArmTransferLimit();
            _source.Tell(new MigrationProtocol.Accepted(_offer.Name));
        });
        Ending();
    }

    private void WritingRound()
    {
        Receive<RoundWritten>(w =>
        {
            if (w.Error is { } why)
            {
                Refuse(why);
                return;
            }
            ArmTransferLimit();
            _source.Tell(new MigrationProtocol.RoundReceived(_offer.Name, w.Round));
            Become(Precopying);
        });
        Ending();
    }

    /// <summary>The snapshot's files (after a pre-copy, into the memory file it filled), then the commit.</summary>
    private void Receiving()
    {
        Receive<ISourceRef<MigrationProtocol.Chunk>>(r =>
        {
            if (_files is not null) return; // one stream per snapshot
            IncomingFiles files;
            try { files = _files = new IncomingFiles(_directory, _offer.Files, _precopied); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                Refuse($"cannot make the snapshot's files here: {e.Message}");
                return;
            }
            r.Source.RunForeach(files.Write, Context.Materializer())
                .ContinueWith(t =>
                {
                    files.Dispose();
                    if (!t.IsCompletedSuccessfully) return new Received(null, $"the transfer failed: {t.Exception?.GetBaseException().Message ?? "cancelled"}");
                    try { return new Received(VmRestore.Open(_directory), null); }
                    catch (SnapshotException e) { return new Received(null, $"the snapshot received is not usable: {e.Message}"); }
                })
                .PipeTo(Self);
        });
        Receive<Received>(r =>
        {
            if (r.Restore is null)
            {
                Refuse(r.Error ?? "the transfer failed");
                return;
            }
            _restore = r.Restore;
            _source.Tell(new MigrationProtocol.Ready(_offer.Name));
            Timers.StartSingleTimer("step", new StepTimeout("the source's commit"), MigrationProtocol.StepLimit);
        });
        Receive<MigrationProtocol.Commit>(_ =>
        {
            if (_restore is null) return;
            _handedOver = true;
            Context.Parent.Tell(new StartMigrated(_offer.Name, _offer.Settings, _restore, _directory, _offer.Console, _source));
            Context.Stop(Self);
        });
        Ending();
    }

    private void Ending()
    {
        Receive<MigrationProtocol.Abort>(_ => Context.Stop(Self));
        Receive<StepTimeout>(t => Refuse($"{t.Step} did not come within {MigrationProtocol.StepLimit.TotalSeconds:0} s"));
        Receive<Terminated>(t =>
        {
            if (t.ActorRef.Equals(_source)) Context.Stop(Self);
        });
    }

    private void ArmTransferLimit() => Timers.StartSingleTimer("step", new StepTimeout("the transfer"), MigrationProtocol.StepLimit);

    protected override void PreStart()
    {
        Context.Watch(_source);
        ArmTransferLimit();
        _source.Tell(new MigrationProtocol.Accepted(_offer.Name));
    }

    private void Refuse(string why)
    {
        _source.Tell(new MigrationProtocol.Refused(_offer.Name, why));
        Context.Stop(Self);
    }

    protected override void PostStop()
    {
        _files?.Dispose();
        _precopied?.Dispose();
        if (!_handedOver) MigrationProtocol.DeleteQuietly(_directory);
    }

    /// <summary>The offered files in a new directory: each created at its offered length (sparse), and
    /// every chunk checked to lie within its file. A chunk for no offered file or beyond one's end fails
    /// the transfer. After a pre-copy, the memory file is the one <paramref name="precopied"/> filled.</summary>
    private sealed class IncomingFiles : IDisposable
    {
        private readonly Microsoft.Win32.SafeHandles.SafeFileHandle[] _handles;
        private readonly MigrationProtocol.OfferedFile[] _files;

        public IncomingFiles(string directory, MigrationProtocol.OfferedFile[] files, IncomingFiles? precopied = null)
        {
            _files = files;
            Directory.CreateDirectory(directory);
            _handles = new Microsoft.Win32.SafeHandles.SafeFileHandle[files.Length];
            for (var i = 0; i < files.Length; i++)
            {
                var existing = precopied is not null && files[i].Name == MigrationProtocol.MemoryFile;
                _handles[i] = File.OpenHandle(Path.Combine(directory, files[i].Name), existing ? FileMode.Open : FileMode.CreateNew, FileAccess.ReadWrite);
                if (!existing) RandomAccess.SetLength(_handles[i], files[i].Length);
            }
        }

        public void Write(MigrationProtocol.Chunk chunk)
        {
            if (chunk is null || chunk.File < 0 || chunk.File >= _files.Length || chunk.Bytes is null || chunk.Offset < 0
                || chunk.Offset > _files[chunk.File].Length - chunk.Bytes.Length)
                throw new InvalidDataException("a chunk outside the files offered");
            RandomAccess.Write(_handles[chunk.File], chunk.Bytes, chunk.Offset);
        }

        public void Dispose()
        {
            foreach (var h in _handles) h?.Dispose();
        }
    }
}
