using System.Security.Cryptography.X509Certificates;
using System.Text;
using Akka.Actor;
using Akka.Configuration;
using ActorVmm.Devices;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.Memory;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Control;

/// <summary>A `ctl` request that cannot be answered, said in one line a user can act on.</summary>
public sealed class ControlException(string message) : Exception(message);

/// <summary>
/// The `actorvmm ctl` side: an actor system of its own with remoting on 127.0.0.1 (port 0),
/// talking to host processes at their announced addresses. Outside any actor, so it may Ask.
/// </summary>
public sealed class ControlClient : IAsyncDisposable
{
    public const string HostSystemName = "actorvmm";
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(5);

    private readonly ActorSystem _system;
    private readonly TimeSpan _timeout;

    private ControlClient(ActorSystem system, TimeSpan timeout)
    {
        _system = system;
        _timeout = timeout;
    }

    /// <summary>
    /// A client that proves it may control the hosts with the cluster certificate: <paramref name="certificate"/>,
    /// else cluster.pfx in <paramref name="directory"/> (else in the default host directory). It must
    /// be the hosts' own; a client without it cannot reach them.
    /// </summary>
    public static ControlClient Create(TimeSpan? timeout = null, string? directory = null, string? certificate = null)
    {
        var path = certificate ?? ClusterCertificate.DefaultPath(directory ?? HostDirectory.DefaultPath());
        if (!File.Exists(path))
            throw new ControlException($"no cluster certificate at {path}: no host of this user has run with that directory (or give the hosts' certificate)");
        X509Certificate2 loaded;
        try { loaded = ClusterCertificate.Load(path); }
        catch (ClusterSecurityException e) { throw new ControlException(e.Message); }
        var config = ConfigurationFactory.ParseString($$"""
            akka.loglevel = ERROR
            akka.stdout-loglevel = OFF
            akka.log-dead-letters = off
            akka.actor.provider = remote
            akka.remote.dot-netty.tcp { hostname = "127.0.0.1", port = 0, connection-timeout = 60 s }
            akka.remote.log-remote-lifecycle-events = off
            # ctl watches the actors it follows (trace, console): a host whose first heartbeats come
            # slowly (a loaded or emulated machine) is not to be taken for a dead one.
            akka.remote.watch-failure-detector.acceptable-heartbeat-pause = 60 s
            akka.coordinated-shutdown.run-by-clr-shutdown-hook = off
            akka.actor.serializers.hyperion = "ActorVmm.Host.Control.LazyHyperionSerializer, actorvmm"
            akka.actor.serialization-bindings { "System.Object" = hyperion }
            {{ClusterCertificate.RemotingConfig}}
            """);
        RemotingTransport.WithoutDotNettyLogging();
        var setup = BootstrapSetup.Create().WithConfig(config).And(ClusterCertificate.Remoting(loaded));
        return new ControlClient(ActorSystem.Create("actorvmm-ctl", setup), timeout ?? DefaultTimeout);
    }

    /// <summary>"127.0.0.1:4711" or a full akka.ssl.tcp address → the host's actor system address
    /// (remoting over TLS: the akka.ssl.tcp protocol).</summary>
    public static string HostAddress(string host) =>
        host.StartsWith("akka.ssl.tcp://", StringComparison.Ordinal) ? host.TrimEnd('/') : $"akka.ssl.tcp://{HostSystemName}@{host}";

    /// <summary>Asks one host for its VMs (a host node: every VM of its cluster).</summary>
    public async Task<ControlProtocol.VmList> ListAsync(string host) =>
        await Ask<ControlProtocol.VmList>(await Directory(host), ControlProtocol.ListVms.Instance, $"host {host}");

    /// <summary>No answer in time (ResolveOne wraps the ask's timeout in an ActorNotFoundException);
    /// an ActorNotFoundException of its own is an answer, no such actor, which <see cref="ResolveWithRetries"/> also asks again.</summary>
    private static bool NoAnswer(Exception e) =>
        e is TimeoutException or AskTimeoutException
        || e is ActorNotFoundException { InnerException: { } inner } && NoAnswer(inner);

    /// <summary>
    /// Resolves <paramref name="selection"/> within <paramref name="total"/>, asking again after 5 s,
    /// then 10 s, 20 s, ...: the first Identify of a new remoting association can be lost (a host
    /// too loaded to finish the handshake in time drops it), and one ask would then wait out all
    /// of <paramref name="total"/> for nothing. "No such actor" is asked again too, after a second:
    /// when a handshake fails, Akka's remoting gates the endpoint and its dead letters answer the
    /// Identify with no actor at once, the same answer a host without the actor gives; every host has
    /// the directory actor, so within <paramref name="total"/> that answer is taken as not yet.
    /// </summary>
    private static async Task<IActorRef> ResolveWithRetries(ActorSelection selection, TimeSpan total)
    {
        var deadline = DateTime.UtcNow + total;
        var attempt = TimeSpan.FromSeconds(5);
        while (true)
        {
            var left = deadline - DateTime.UtcNow;
            var wait = left < attempt ? left : attempt;
            try
            {
                return await selection.ResolveOne(wait > TimeSpan.Zero ? wait : TimeSpan.FromMilliseconds(1));
            }
            catch (Exception e) when (NoAnswer(e) && DateTime.UtcNow + TimeSpan.FromMilliseconds(100) < deadline)
            {
                attempt += attempt;
            }
            catch (ActorNotFoundException) when (DateTime.UtcNow + TimeSpan.FromSeconds(1) < deadline)
            {
                await Task.Delay(TimeSpan.FromSeconds(1));
            }
        }
    }

    /// <summary>The hosts to ask: the one given, or every announced one.</summary>
    public static IReadOnlyList<string> Hosts(string? host, string? directory)
    {
        if (host is not null) return [host];
        var dir = directory ?? HostDirectory.DefaultPath();
        var hosts = HostDirectory.Read(dir).Select(e => e.Address).ToArray();
        if (hosts.Length == 0) throw new ControlException($"no ActorVmm host is running (none announced in {dir}); give --host HOST:PORT");
        return hosts;
    }

    /// <summary>Finds a VM by name among <paramref name="hosts"/>.</summary>
    public async Task<IActorRef> FindVmAsync(string name, IReadOnlyList<string> hosts)
    {
        var entry = await FindEntryAsync(name, hosts);
        if (entry.Ended.Length > 0) throw new ControlException($"{name} has ended: {entry.Ended}");
        return entry.Actor;
    }

    /// <summary>The directory entry of a VM (its actor and its trace hub).</summary>
    public async Task<ControlProtocol.VmEntry> FindEntryAsync(string name, IReadOnlyList<string> hosts)
    {
        var names = new List<string>();
        foreach (var host in hosts)
        {
            var list = await ListAsync(host);
            var vm = list.Vms.FirstOrDefault(v => v.Name == name);
            if (vm is not null) return vm;
            names.AddRange(list.Vms.Select(v => v.Name));
        }
        throw new ControlException(names.Count == 0
            ? $"no VM named {name}: no VM is running"
            : $"no VM named {name} (running: {string.Join(", ", names.Order())})");
    }

    public Task<VmProtocol.Status> StatusAsync(IActorRef vm) => Ask<VmProtocol.Status>(vm, VmProtocol.GetStatus.Instance, "the VM");

    public async Task<VmProtocol.Status> PauseAsync(IActorRef vm) => await Command(vm, VmProtocol.Pause.Instance);
    public async Task<VmProtocol.Status> ResumeAsync(IActorRef vm) => await Command(vm, VmProtocol.Resume.Instance);
    public async Task<VmProtocol.Status> StopAsync(IActorRef vm) => await Command(vm, new VmProtocol.Stop("stopped by ctl"));

    /// <summary>
    /// Snapshots the VM into <paramref name="directory"/> (a path on the VM's host, made absolute here:
    /// the host process has a working directory of its own) and says what was written; with
    /// <paramref name="stop"/> the VM ends afterwards. Writing guest memory can take a while: the
    /// answer is awaited up to <see cref="SnapshotTaker.StepLimit"/> beyond the usual wait.
    /// </summary>
    public async Task<string> SnapshotAsync(IActorRef vm, string directory, bool stop)
    {
        var answer = await Ask<VmProtocol.IVmMessage>(vm, new VmProtocol.TakeSnapshot(Path.GetFullPath(directory), stop), "the VM",
            SnapshotTaker.StepLimit * 2);
        return answer switch
        {
            VmProtocol.SnapshotTaken t =>
                $"{t.Vm}: snapshot in {t.Directory}: {t.MemoryPages} guest pages ({t.MemoryBytes >> 10} KiB) written, " +
                $"paused {t.Paused.TotalMilliseconds:0.#} ms, total {t.Total.TotalMilliseconds:0.#} ms{(t.Stopped ? "; the VM stopped" : "")}\n",
            VmProtocol.SnapshotFailed f => throw new ControlException($"{f.Vm}: no snapshot taken: {f.Reason}"),
            _ => throw new ControlException("the VM answered something unexpected"),
        };
    }

    private async Task<VmProtocol.Status> Command(IActorRef vm, object command)
    {
        vm.Tell(command);
        return await StatusAsync(vm); // mailbox order: the status reflects the command
    }

    /// <summary>The VM's child <paramref name="name"/>. One the VM says it has (<paramref name="listed"/>) is
    /// asked for again until the timeout: a remote endpoint that is gated answers "no such actor" at once.</summary>
    private async Task<IActorRef> Child(IActorRef vm, string name, bool listed = false)
    {
        try
        {
            var selection = _system.ActorSelection(vm.Path / name);
            return listed ? await ResolveWithRetries(selection, _timeout) : await selection.ResolveOne(_timeout);
        }
        catch (Exception e) when (e is ActorNotFoundException or TimeoutException or AskTimeoutException)
        {
            throw new ControlException($"{vm.Path.Name} has no {name}");
        }
    }

    /// <summary>The register state of a vcpu, and the guest memory at its RIP.</summary>
    public async Task<(VcpuProtocol.Registers Registers, byte[] Code, ulong Linear)> RegistersAsync(IActorRef vm, int vcpu)
    {
        var actor = await Child(vm, $"vcpu-{vcpu}");
        var reply = await Ask<object>(actor, VcpuProtocol.GetRegisters.Instance, $"vcpu {vcpu}");
        if (reply is VcpuProtocol.Refused refused) throw new ControlException($"vcpu {vcpu}: {refused.Why}");
        if (reply is not VcpuProtocol.Registers regs) throw new ControlException($"vcpu {vcpu} answered {reply.GetType().Name}");
        var vmspace = await Child(vm, "vmspace");
        var linear = regs.Special.CodeBitness == 64 ? regs.General.Rip : regs.Special.Cs.Base + regs.General.Rip;
        var code = await GuestPageWalk.ReadLinearAsync(regs.Special, linear, 15,
            async (address, length) =>
            {
                var r = await Ask<object>(vmspace, new VmspaceProtocol.ReadMemory(0, address, length), "the vmspace");
                return r is VmspaceProtocol.MemoryData data ? data.Data : null;
            });
        return (regs, code, linear);
    }

    /// <summary>The local APIC state of a vcpu as `ctl regs` prints it, or null when the VM has no
    /// vlapic for it (a VM without interrupt platform).</summary>
    public async Task<string?> LapicAsync(IActorRef vm, int vcpu)
    {
        IActorRef actor;
        try { actor = await Child(vm, $"vlapic-{vcpu}"); }
        catch (ControlException) { return null; }
        var reply = await Ask<VlapicProtocol.StateReply>(actor, VlapicProtocol.GetState.Instance, $"the local APIC of vcpu {vcpu}");
        return LapicDump.Format(reply.VcpuId, reply.State);
    }

    /// <summary>Counters of every vcpu, device and the vmspace of a VM.</summary>
    public async Task<string> StatsAsync(IActorRef vm)
    {
        var status = await StatusAsync(vm);
        var sb = new StringBuilder();
        sb.AppendLine($"{status.Vm}: {status.Phase}, {status.Vcpus} vcpu(s)");
        sb.AppendLine($"{"vcpu",-6}{"state",-10}{"exits",10}{"io",10}{"mmio",10}{"hlt",8}{"intr",8}{"unassigned r/w",16}{"injected",10}");
        for (var i = 0; i < status.Vcpus; i++)
        {
            var s = await Ask<VcpuProtocol.Stats>(await Child(vm, $"vcpu-{i}"), VcpuProtocol.GetStats.Instance, $"vcpu {i}");
            sb.AppendLine($"{i,-6}{s.State,-10}{s.Exits,10}{s.IoExits,10}{s.MmioExits,10}{s.HltExits,8}{s.IntrExits,8}" +
                          $"{$"{s.UnassignedReads}/{s.UnassignedWrites}",16}{s.Injected,10}");
            foreach (var r in s.Reasons)
                sb.AppendLine($"      {r.Reason,-11}{r.Count,10}  handled in µs: {Histogram(r.LatencyBuckets)}");
        }
        for (var i = 0; i < status.Vcpus; i++)
        {
            IActorRef vlapic;
            try { vlapic = await Child(vm, $"vlapic-{i}"); }
            catch (ControlException) { break; } // a VM without local APICs
            var l = await Ask<VlapicProtocol.Stats>(vlapic, VlapicProtocol.GetStats.Instance, $"vlapic {i}");
            sb.AppendLine($"vlapic {i}: {l.IpisSent} IPIs sent, {l.Delivered} interrupts delivered, {l.Accepted} accepted, " +
                          $"{l.TimerCallbacks} timer callbacks, {l.Restarts} restarts");
        }
        var mem = await Ask<VmspaceProtocol.Stats>(await Child(vm, "vmspace"), VmspaceProtocol.GetStats.Instance, "the vmspace");
        sb.AppendLine($"memory: {mem.GuestBytes >> 20} MiB guest, {mem.ResidentBytes >> 10} KiB allocated");
        if (mem.Paging is { Enabled: true } p)
            sb.AppendLine($"nested page faults: {p.MissingFaults} missing, {p.MinorFaults} minor (accessed), {p.WriteProtectFaults} write-protect (dirty); " +
                          $"{p.SwapOuts} swap-outs, {p.SwapIns} swap-ins");
        foreach (var device in status.Devices ?? [])
        {
            IActorRef actor;
            try { actor = await Child(vm, device, listed: true); }
            catch (ControlException)
            {
                sb.AppendLine($"device {device}: did not answer (it may have just stopped)");
                continue;
            }
            var d = await Ask<DeviceProtocol.Stats>(actor, DeviceProtocol.GetStats.Instance, device);
            sb.AppendLine($"device {d.Device}: {d.Reads} reads, {d.Writes} writes{(d.Location is { } where ? $" ({where})" : "")}");
        }
        foreach (var restart in status.Restarts ?? [])
            sb.AppendLine($"restarted after a failure: {restart}");
        if (status.Migration is { } migration) sb.AppendLine($"last migration: {migration}");
        return sb.ToString();
    }

    private static IActorRef TraceOf(ControlProtocol.VmEntry vm) =>
        vm.Trace.IsNobody()
            ? throw new ControlException($"VM {vm.Name} is not traced: start it with --trace FILE, --perfetto FILE or actorvmm.vm.trace-live = on")
            : vm.Trace;

    /// <summary>The latest <paramref name="count"/> traced messages of a VM.</summary>
    public async Task<TraceProtocol.TraceLine[]> RecentTraceAsync(ControlProtocol.VmEntry vm, int count, string filter) =>
        (await Ask<object>(TraceOf(vm), new TraceProtocol.GetRecent(count, filter), $"the trace of {vm.Name}")) switch
        {
            TraceProtocol.Recent r => r.Lines,
            TraceProtocol.Refused refused => throw new ControlException(refused.Why),
            var other => throw new ControlException($"the trace of {vm.Name} answered {other.GetType().Name}"),
        };

    /// <summary>Follows a VM's trace: each new line goes to <paramref name="onLine"/> until
    /// <paramref name="cancel"/>, <paramref name="count"/> lines, or the VM's trace ends.
    /// <paramref name="onSubscribed"/> is called once the VM's trace hub streams to this client.</summary>
    public async Task<int> FollowTraceAsync(ControlProtocol.VmEntry vm, string filter, int count, Action<TraceProtocol.TraceLine> onLine,
        CancellationToken cancel, Action? onSubscribed = null)
    {
        var hub = TraceOf(vm);
        var lines = System.Threading.Channels.Channel.CreateUnbounded<TraceProtocol.TraceLine?>();
        var follower = _system.ActorOf(Props.Create(() => new Follower(hub, lines.Writer)));
        try
        {
            var reply = await Ask<object>(hub, new TraceProtocol.Subscribe(follower, filter), $"the trace of {vm.Name}");
            if (reply is TraceProtocol.Refused refused) throw new ControlException(refused.Why);
            onSubscribed?.Invoke(); // from here on, every message the VM records reaches onLine
            var seen = 0;
            await foreach (var line in lines.Reader.ReadAllAsync(cancel))
            {
                if (line is null) break; // the hub (the VM's host) went away
                onLine(line);
                if (++seen == count) break;
            }
            return seen;
        }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested)
        {
            return -1;
        }
        finally
        {
            hub.Tell(new TraceProtocol.Unsubscribe(follower));
            _system.Stop(follower);
        }
    }

    /// <summary>
    /// `ctl run`: asks host node <paramref name="host"/> to start VM <paramref name="name"/> from
    /// <paramref name="settings"/> on <paramref name="node"/> (HOST:PORT) or where the cluster's placement
    /// puts it. Answers the node it runs on; a refusal is a <see cref="ControlException"/> with its reason.
    /// </summary>
    public async Task<string> RunVmAsync(string host, string name, IReadOnlyList<KeyValuePair<string, string>> settings, string? node)
    {
        var directory = await Directory(host);
        var reply = await Ask<object>(directory,
            new Cluster.NodeProtocol.RunVm(name, settings.Select(kv => new Cluster.NodeProtocol.Setting(kv.Key, kv.Value)).ToArray(), node ?? ""),
            $"host {host}", Cluster.PlacementActor.StartLimit);
        return reply switch
        {
            Cluster.NodeProtocol.VmStarted started => started.Node,
            Cluster.NodeProtocol.RunRefused refused => throw new ControlException($"cannot run {name}: {refused.Why}"),
            _ => throw new ControlException($"host {host} answered {reply.GetType().Name}: is it a host node (actorvmm host)?"),
        };
    }

    /// <summary>
    /// `ctl migrate`: asks the node VM <paramref name="vm"/> runs on to move it to node <paramref name="to"/>
    /// (HOST:PORT), passing each progress report to <paramref name="progress"/> (if given) while it runs.
    /// Answers a line saying what moved and how long the guest was stopped; a failure is a
    /// <see cref="ControlException"/> saying where the VM runs now.
    /// </summary>
    public async Task<string> MigrateAsync(ControlProtocol.VmEntry vm, string to, Action<Cluster.MigrationProtocol.Progress>? progress = null,
        TimeSpan? maxDowntime = null, bool stopAndCopy = false)
    {
        if (vm.Ended.Length > 0) throw new ControlException($"{vm.Name} has ended: {vm.Ended}");
        var directory = await Directory(vm.Node);
        var answers = System.Threading.Channels.Channel.CreateUnbounded<object?>();
        var listener = _system.ActorOf(Props.Create(() => new Listener(directory, answers.Writer)));
        try
        {
            directory.Tell(new Cluster.MigrationProtocol.MigrateVm(vm.Name, to, ReportProgress: progress is not null, maxDowntime, stopAndCopy), listener);
            // Each report (at least one per step or second) restarts the wait; a step has its own limit on the node.
            var quiet = _timeout + Cluster.MigrationProtocol.StepLimit * 3;
            while (true)
            {
                object? reply;
                try { reply = await answers.Reader.ReadAsync().AsTask().WaitAsync(quiet); }
                catch (TimeoutException) { throw new ControlException($"host {vm.Node} said nothing of the migration for {quiet.TotalSeconds:0} s"); }
                switch (reply)
                {
                    case Cluster.MigrationProtocol.Progress p:
                        progress?.Invoke(p);
                        continue;
                    case Cluster.MigrationProtocol.Migrated m:
                        return $"{m}\n";
                    case Cluster.MigrationProtocol.MigrationFailed f:
                        throw new ControlException($"{f.Name} not migrated: {f.Why}");
                    case null:
                        throw new ControlException($"host {vm.Node} went away during the migration");
                    default:
                        throw new ControlException($"host {vm.Node} answered {reply.GetType().Name}: is it a host node (actorvmm host)?");
                }
            }
        }
        finally
        {
            _system.Stop(listener);
        }
    }

    /// <summary>Receives a request's answers in the ctl process; a null marks the host's end.</summary>
    private sealed class Listener : ReceiveActor
    {
        public Listener(IActorRef host, System.Threading.Channels.ChannelWriter<object?> answers)
        {
            Context.Watch(host);
            Receive<Terminated>(_ => answers.TryWrite(null));
            ReceiveAny(m => answers.TryWrite(m));
        }
    }

    /// <summary>`ctl nodes`: the cluster's members as host node <paramref name="host"/> sees them.</summary>
    public async Task<Cluster.NodeProtocol.Members> NodesAsync(string host) =>
        await Ask<object>(await Directory(host), Cluster.NodeProtocol.ListNodes.Instance, $"host {host}") switch
        {
            Cluster.NodeProtocol.Members m => m,
            var other => throw new ControlException($"host {host} answered {other.GetType().Name}: is it a host node (actorvmm host)?"),
        };

    private async Task<IActorRef> Directory(string host)
    {
        try
        {
            return await ResolveWithRetries(_system.ActorSelection($"{HostAddress(host)}/user/{ControlProtocol.DirectoryName}"), _timeout);
        }
        catch (Exception e) when (e is ActorNotFoundException or TimeoutException or AskTimeoutException)
        {
            throw new ControlException($"host {host} does not answer (is an ActorVmm host running there?)");
        }
    }

    /// <summary>
    /// `ctl console`: writes the VM's kept output to <paramref name="output"/>; with <paramref name="follow"/>
    /// then everything it writes until it ends or <paramref name="cancel"/>, sending each line of
    /// <paramref name="input"/> (if any) to the guest. Answers how the VM ended, or null while it runs.
    /// </summary>
    public async Task<string?> ConsoleAsync(ControlProtocol.VmEntry vm, bool follow, Stream output, TextReader? input, CancellationToken cancel)
    {
        if (vm.Console.IsNobody()) throw new ControlException($"{vm.Name} has no console to attach to (its host is older, or the VM is not on a host that keeps one)");
        var chunks = System.Threading.Channels.Channel.CreateUnbounded<object?>();
        var client = _system.ActorOf(Props.Create(() => new ConsoleClient(vm.Console, chunks.Writer)));
        try
        {
            vm.Console.Tell(new Cluster.ConsoleProtocol.Attach(client, follow), client);
            var history = await chunks.Reader.ReadAsync(cancel).AsTask().WaitAsync(_timeout, cancel);
            if (history is not Cluster.ConsoleProtocol.History h) throw new ControlException($"the console of {vm.Name} went away");
            await output.WriteAsync(h.Bytes, cancel);
            await output.FlushAsync(cancel);
            if (h.Ended) return h.Detail;
            if (!follow) return null;
            if (input is not null)
                _ = Task.Run(async () =>
                {
                    while (!cancel.IsCancellationRequested && await input.ReadLineAsync(cancel) is { } line)
                        vm.Console.Tell(new Cluster.ConsoleProtocol.Input(Encoding.UTF8.GetBytes(line + "\n")));
                }, cancel);
            await foreach (var item in chunks.Reader.ReadAllAsync(cancel))
            {
                if (item is not Cluster.ConsoleProtocol.Chunk chunk) return null; // the host went away
                await output.WriteAsync(chunk.Bytes, cancel);
                await output.FlushAsync(cancel);
                if (chunk.Ended) return chunk.Detail;
            }
            return null;
        }
        catch (OperationCanceledException) when (cancel.IsCancellationRequested)
        {
            return null;
        }
        catch (TimeoutException)
        {
            throw new ControlException($"the console of {vm.Name} did not answer within {_timeout.TotalSeconds:0} s");
        }
        finally
        {
            vm.Console.Tell(new Cluster.ConsoleProtocol.Detach(client));
            _system.Stop(client);
        }
    }

    /// <summary>Receives console output in the ctl process; a null marks the hub's end.</summary>
    private sealed class ConsoleClient : ReceiveActor
    {
        public ConsoleClient(IActorRef hub, System.Threading.Channels.ChannelWriter<object?> chunks)
        {
            Context.Watch(hub);
            Receive<Cluster.ConsoleProtocol.History>(h => chunks.TryWrite(h));
            Receive<Cluster.ConsoleProtocol.Chunk>(c => chunks.TryWrite(c));
            Receive<Terminated>(_ => chunks.TryWrite(null));
        }
    }

    /// <summary>Receives trace lines in the ctl process; a null marks the end.</summary>
    private sealed class Follower : ReceiveActor
    {
        public Follower(IActorRef hub, System.Threading.Channels.ChannelWriter<TraceProtocol.TraceLine?> lines)
        {
            Context.Watch(hub);
            Receive<TraceProtocol.TraceLine>(l => lines.TryWrite(l));
            Receive<Terminated>(_ => lines.TryWrite(null));
        }
    }

    /// <summary>Fault injection into a live VM: makes one of its actors (a path below the VM,
    /// e.g. "uart0", "vcpu-1", "vmspace") throw; its supervisor decides what happens.</summary>
    public async Task<string> CrashAsync(IActorRef vm, string actorPath, string reason)
    {
        var target = await Child(vm, actorPath);
        var name = actorPath.Split('/')[^1];
        var restartsBefore = (await StatusAsync(vm)).Restarts?.Count(r => r.StartsWith(name + ":", StringComparison.Ordinal)) ?? 0;
        target.Tell(new FaultProtocol.Crash(reason));
        // What the supervisor made of it: a restart shows in the VM's status, a stop ends the VM.
        var status = await StatusAsync(vm);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        while (DateTime.UtcNow < deadline && status.Phase is VmProtocol.Phase.Running or VmProtocol.Phase.Paused &&
               (status.Restarts?.Count(r => r.StartsWith(name + ":", StringComparison.Ordinal)) ?? 0) == restartsBefore)
        {
            await Task.Delay(20);
            status = await StatusAsync(vm);
        }
        var restarted = (status.Restarts?.Count(r => r.StartsWith(name + ":", StringComparison.Ordinal)) ?? 0) > restartsBefore;
        return $"crashed {vm.Path.Name}/{actorPath}" + (restarted ? "; it was restarted from its saved state" : "") +
               $"; the VM is {status.Phase}" + (status.Outcome is { } o ? $": {o.Detail}" : "") + "\n";
    }

    /// <summary>Fault injection that answers (a stall once it is over, a page fault failure once
    /// armed): the answer as text.</summary>
    /// <param name="lasts">how long the fault itself takes before it answers</param>
    /// <param name="vm">the VM actor</param>
    /// <param name="actorPath">the target actor, relative to the VM (e.g. "uart0", "vcpu-0")</param>
    /// <param name="fault">the fault message, which the target answers</param>
    public async Task<string> InjectAsync(IActorRef vm, string actorPath, FaultProtocol.IFaultMessage fault, TimeSpan lasts)
    {
        var target = await Child(vm, actorPath);
        var reply = await Ask<object>(target, fault, $"{vm.Path.Name}/{actorPath}", lasts);
        return reply switch
        {
            FaultProtocol.Injected i => $"{vm.Path.Name}/{actorPath}: {i.What}\n",
            FaultProtocol.NotInjected n => throw new ControlException($"{vm.Path.Name}/{actorPath}: {n.Why}"),
            _ => throw new ControlException($"{vm.Path.Name}/{actorPath} answered {reply.GetType().Name}"),
        };
    }

    /// <summary>The vmspace's counters: allocated memory and, with demand paging, resident,
    /// swapped, held, accessed and dirty pages and faults by kind.</summary>
    public async Task<string> MemoryAsync(IActorRef vm)
    {
        var s = await Ask<VmspaceProtocol.Stats>(await Child(vm, "vmspace"), VmspaceProtocol.GetStats.Instance, "the vmspace");
        var p = s.Paging;
        var sb = new StringBuilder();
        sb.AppendLine($"guest memory   {s.GuestBytes >> 20} MiB, {s.ResidentBytes >> 10} KiB allocated by the host");
        sb.AppendLine($"host accesses  {s.Reads} reads, {s.Writes} writes, {s.Faults} refused");
        if (p.Superpages.Length > 0) sb.AppendLine($"superpages     {p.Superpages}; {p.SuperpagePages} pages superpage-backed");
        if (s.WiredBytes > 0) sb.AppendLine($"wired          {s.WiredBytes >> 10} KiB locked in RAM (a passthru-style device): no demand paging, no swap");
        if (s.Restore is { Mode: not "none" } r)
            sb.AppendLine($"restore        {r.Mode} from a snapshot: {r.ImagePages} pages saved, {r.RestoredPages} brought in, {r.PendingPages} still in the file");
        var d = s.Dirty;
        sb.AppendLine(d.Tracking == "dirty-ring"
            ? $"dirty tracking dirty-ring: {d.BarrierHarvests} harvests at the EPT barrier, {d.RingFullHarvests} on a full ring, {d.HarvestedGfns} GFNs"
            : $"dirty tracking {d.Tracking}");
        if (!p.Enabled)
        {
            sb.AppendLine($"demand paging  off ({p.Features})");
            return sb.ToString();
        }
        sb.AppendLine($"demand paging  on ({p.Features}), EPT generation {p.EptGeneration}");
        sb.AppendLine($"pages          {p.RamPages} RAM, {p.ResidentPages} resident, {p.SwappedPages} swapped, {p.HeldPages} held");
        sb.AppendLine($"pmap A/D       {p.AccessedPages} accessed, {p.DirtyPages} dirty (since the last clear)");
        sb.AppendLine($"resident       peak {p.PeakResidentPages} pages, limit " + (p.ResidentLimitPages == 0 ? "none" : $"{p.ResidentLimitPages} pages"));
        sb.AppendLine("swapper        " + (p.ScanInterval <= TimeSpan.Zero ? "off"
            : $"every {p.ScanInterval.TotalMilliseconds:0} ms: {p.AccessedScans} accessed-bit scans, {p.ScanPageOuts} pages swapped out"));
        sb.AppendLine($"faults         {p.MissingFaults} missing, {p.MinorFaults} minor (accessed), {p.WriteProtectFaults} write-protect (dirty)");
        sb.AppendLine($"resolved       {p.ZeroFills} zero fills, {p.SwapIns} swap-ins, {p.SwapOuts} swap-outs, {p.Reclaims} reclaims, {p.Retries} retries");
        if (p.Failure is not null) sb.AppendLine($"FAILED         {p.Failure}");
        return sb.ToString();
    }

    /// <summary>"&lt;1:12 1-2:3 ... &gt;=1024:0", non-empty buckets only.</summary>
    public static string Histogram(long[] buckets)
    {
        var parts = new List<string>();
        for (var b = 0; b < buckets.Length; b++)
        {
            if (buckets[b] == 0) continue;
            var label = b == 0 ? "<1" : b == buckets.Length - 1 ? $">={1 << (b - 1)}" : $"{1 << (b - 1)}-{1 << b}";
            parts.Add($"{label}:{buckets[b]}");
        }
        return parts.Count == 0 ? "(none handled yet)" : string.Join(' ', parts);
    }

    private async Task<T> Ask<T>(ICanTell target, object message, string what, TimeSpan extra = default)
    {
        var timeout = _timeout + extra;
        try
        {
            return await target.Ask<T>(message, timeout);
        }
        catch (AskTimeoutException)
        {
            throw new ControlException($"{what} did not answer within {timeout.TotalSeconds:0.#} s");
        }
        catch (InvalidCastException)
        {
            throw new ControlException($"{what} answered something unexpected");
        }
    }

    public async ValueTask DisposeAsync() => await _system.Terminate();
}
