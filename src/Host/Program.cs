using System.CommandLine;
using System.Globalization;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using Akka.Configuration;

StartupTimes.Mark("main");
return await Cli.MainAsync(args);

namespace ActorVmm.Host
{
    /// <summary>The `actorvmm` command line. Errors are one line on stderr and exit code 2.</summary>
    public static class Cli
    {
        public static async Task<int> MainAsync(string[] args)
        {
            // First uses that are slow and would otherwise come on the actor system's start, the
            // critical path of a run, made on the thread pool while the command line is parsed:
            // Akka's HOCON reads each duration through a compiled regular expression, built and
            // compiled (tens of ms) at its first use; Akka seeds its actors' uids from the system's
            // random number generator, which loads OpenSSL at its first use.
            if (args.Length > 0 && args[0] is "run" or "demo")
                _ = Task.Run(() =>
                {
                    _ = ConfigurationFactory.ParseString("d = 1s").GetTimeSpan("d");
                    _ = System.Security.Cryptography.RandomNumberGenerator.GetInt32(int.MaxValue);
                });

            var root = new RootCommand("ActorVmm: a virtual machine monitor for Linux KVM built from Akka.NET actors");
            root.Add(RunCommand());
            root.Add(DemoCommand());
            root.Add(CtlCommand());
            root.Add(HostCommand());

            var parse = root.Parse(args);
            if (parse.Errors.Count > 0)
            {
                foreach (var error in parse.Errors) await Console.Error.WriteLineAsync($"actorvmm: error: {error.Message}");
                await Console.Error.WriteLineAsync("Try 'actorvmm --help'.");
                return VmProtocol.Outcome.HostErrorCode;
            }
            try
            {
                // Signals are the commands' own business (run and demo stop the VM cleanly, which can
                // take seconds on a slow host): no forced exit two seconds after a Ctrl-C.
                return await parse.InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false, ProcessTerminationTimeout = null });
            }
            catch (Exception e) when (e is ConfigException or BootException or VmBuildException or Control.ControlException or Control.ClusterSecurityException)
            {
                await Console.Error.WriteLineAsync($"actorvmm: error: {e.Message}");
                return VmProtocol.Outcome.HostErrorCode;
            }
            finally { StartupTimes.Write(Console.Error); }
        }

        /// <summary>
        /// The options that describe a VM, shared by `run` and `ctl run`: each becomes a setting under
        /// actorvmm.vm (the same keys a HOCON file has), so a VM given on the command line, in a file
        /// or sent to a host node is read by one code path (<see cref="VmConfig.From"/>, <see cref="BootSource.FromConfig"/>).
        /// </summary>
        internal sealed class VmOptions
        {
            public readonly Option<string?> Config = new("--config") { Description = "a HOCON VM file (see hocon/vms/example.conf)" };
            public readonly Option<string?> Memory = new("--memory", "-m") { Description = "guest RAM, e.g. 64M, 1G" };
            public readonly Option<string?> Cpus = new("--cpus") { Description = "number of vcpus (1-16); vcpu 0 boots" };
            public readonly Option<string?> Firmware = new("--firmware") { Description = "flat firmware image placed below 4 GiB (reset vector F000:FFF0)" };
            public readonly Option<string?> Flat = new("--flat") { Description = "flat binary loaded at --load-address, entered in real mode" };
            public readonly Option<string?> LoadAddress = new("--load-address") { Description = "where --flat loads (default 0x7C00)" };
            public readonly Option<string?> Entry = new("--entry") { Description = "real-mode entry CS:IP in hex for --flat (default from the load address)" };
            public readonly Option<string?> Kernel = new("--kernel") { Description = "a kernel image, recognised by its contents (multiboot ELF or Linux bzImage)" };
            public readonly Option<string?> Initrd = new("--initrd") { Description = "with --kernel: the initial ramdisk (Linux) or first module (multiboot)" };
            public readonly Option<string?> Append = new("--append") { Description = "with --kernel: the kernel command line" };
            public readonly Option<string?> Serial = new("--serial") { Description = "serial console output: stdout or a file" };
            public readonly Option<string?> Trace = new("--trace") { Description = "write the message trace to FILE as JSON lines" };
            public readonly Option<string?> Timeout = new("--timeout") { Description = "stop the VM after this many seconds" };
            public readonly Option<string?> Perfetto = new("--perfetto") { Description = "write the message trace to FILE for the Perfetto UI when the VM ends" };
            public readonly Option<string?> TraceFilter = new("--trace-filter") { Description = "keep only some of the trace: actor=NAME,type=NAME,sample=N" };
            public readonly Option<string?> Lapic = new("--lapic") { Description = "local APICs: emulated (vlapic actors) or assisted (in KVM: split irqchip)" };
            public readonly Option<string?> Cpu = new("--cpu") { Description = "CPU model: host[,+feature|-feature...], e.g. host,-x2apic,-pcid,-tsc-deadline (QEMU's -cpu syntax)" };
            public readonly Option<string?> Shm = new("--shm") { Description = "FILE[,SIZE]: a shared-memory device at 0xE0000000 backed by FILE (created or extended to SIZE); wires all guest memory" };
            public readonly Option<bool> TestDevices = new("--test-devices")
            {
                Description = "QEMU's test devices for conformance suites (pc-testdev: ports 0xE0-0xEB and 0x2000-0x2017, MMIO RAM at 0xFF000000)",
            };
            public readonly Option<bool> Rng = new("--rng") { Description = "a virtio entropy device (virtio-rng, PCI 00:01.0) fed from the host's RandomNumberGenerator" };
            public readonly Option<string?> Disk = new("--disk") { Description = "FILE[,ro]: a virtio block device (virtio-blk, PCI 00:02.0) backed by the existing FILE; ,ro: read-only" };
            public readonly Option<bool> VirtioConsole = new("--virtio-console") { Description = "a virtio console (virtio-console, PCI 00:03.0) on the VM's console, beside COM1" };
            public readonly Option<string?> Net = new("--net") { Description = "tap=NAME[,mac=52:54:00:xx:xx:xx]: a virtio network card (virtio-net, PCI 00:04.0) on the existing TAP interface NAME" };
            public readonly Option<string[]> DeviceNode = new("--device-node")
            {
                Description = "NAME=HOST:PORT: run device NAME (uart0) on that host node of the cluster (ctl run only); repeatable",
            };

            public void AddTo(Command command)
            {
                foreach (var o in new Option[] { Config, Memory, Cpus, Firmware, Flat, LoadAddress, Entry, Kernel, Initrd, Append, Serial, Trace,
                             Timeout, Perfetto, TraceFilter, Lapic, Cpu, Shm, TestDevices, Rng, Disk, VirtioConsole, Net, DeviceNode })
                    command.Add(o);
            }

            /// <summary>The options given, as actorvmm.vm settings. With <paramref name="absolute"/>, file
            /// paths are made absolute (for a host process that has a working directory of its own).</summary>
            public List<KeyValuePair<string, string>> Settings(ParseResult parse, bool absolute)
            {
                var settings = new List<KeyValuePair<string, string>>();
                void Set(string key, string? value, bool path = false)
                {
                    if (value is null) return;
                    settings.Add(new($"actorvmm.vm.{key}", path && absolute && value != "stdout" ? Path.GetFullPath(value) : value));
                }
                Set("memory", parse.GetValue(Memory));
                Set("cpus", parse.GetValue(Cpus));
                Set("serial.output", parse.GetValue(Serial), path: true);
                Set("trace", parse.GetValue(Trace), path: true);
                Set("timeout", parse.GetValue(Timeout));
                Set("perfetto", parse.GetValue(Perfetto), path: true);
                Set("trace-filter", parse.GetValue(TraceFilter));
                Set("lapic", parse.GetValue(Lapic));
                Set("cpu", parse.GetValue(Cpu));
                if (parse.GetValue(TestDevices)) Set("test-devices", "on");
                if (parse.GetValue(Rng)) Set("rng", "on");
                if (parse.GetValue(VirtioConsole)) Set("virtio-console", "on");
                if (parse.GetValue(Disk) is { } diskText)
                {
                    var (file, readOnly) = ParseDisk(diskText);
                    Set("disk.path", file, path: true);
                    Set("disk.read-only", readOnly ? "on" : "off");
                }
                if (parse.GetValue(Net) is { } netText)
                    foreach (var (key, value) in NetSettings(netText)) Set(key, value);
                foreach (var placed in parse.GetValue(DeviceNode) ?? [])
                {
                    var eq = placed.IndexOf('=');
                    if (eq <= 0 || eq == placed.Length - 1) throw new ConfigException($"--device-node \"{placed}\": give NAME=HOST:PORT, e.g. uart0=127.0.0.1:4712");
                    Set($"devices.{placed[..eq]}.node", placed[(eq + 1)..]);
                }
                Set("boot.kernel", parse.GetValue(Kernel), path: true);
                Set("boot.initrd", parse.GetValue(Initrd), path: true);
                Set("boot.append", parse.GetValue(Append));
                Set("boot.firmware", parse.GetValue(Firmware), path: true);
                Set("boot.flat", parse.GetValue(Flat), path: true);
                Set("boot.load-address", parse.GetValue(LoadAddress));
                Set("boot.entry", parse.GetValue(Entry));
                if (parse.GetValue(Shm) is { } shmText)
                {
                    var comma = shmText.LastIndexOf(',');
                    if (comma == 0 || shmText.Length == 0) throw new ConfigException($"--shm \"{shmText}\": give FILE or FILE,SIZE");
                    Set("shm.file", comma < 0 ? shmText : shmText[..comma], path: true);
                    Set("shm.size", comma < 0 ? "0" : shmText[(comma + 1)..]);
                }
                return settings;
            }

            /// <summary>--disk FILE[,ro]: the file and whether it is read-only. A file name may hold commas; only
            /// a last ",ro" is an option (QEMU's doubled ",," is not needed).</summary>
            internal static (string File, bool ReadOnly) ParseDisk(string text)
            {
                var readOnly = text.EndsWith(",ro", StringComparison.Ordinal);
                var file = readOnly ? text[..^3] : text;
                if (file.Length == 0) throw new ConfigException($"--disk \"{text}\": give FILE or FILE,ro");
                return (file, readOnly);
            }

            /// <summary><c>--net tap=NAME[,mac=MAC]</c> as actorvmm.vm.net settings (checked by <see cref="VmConfig.From"/>).</summary>
            internal static IEnumerable<(string Key, string Value)> NetSettings(string text)
            {
                var given = new Dictionary<string, string>(StringComparer.Ordinal);
                foreach (var part in text.Split(','))
                {
                    var eq = part.IndexOf('=');
                    var key = eq < 0 ? part : part[..eq];
                    if (key is not ("tap" or "mac") || eq < 0)
                        throw new ConfigException($"--net \"{text}\": give tap=NAME[,mac=52:54:00:xx:xx:xx] (\"{part}\" is neither)");
                    if (!given.TryAdd(key, part[(eq + 1)..])) throw new ConfigException($"--net \"{text}\": {key} is given twice");
                }
                if (!given.TryGetValue("tap", out var tap) || tap.Length == 0)
                    throw new ConfigException($"--net \"{text}\": tap=NAME is required (an existing TAP interface)");
                yield return ("net.tap", tap);
                if (given.TryGetValue("mac", out var mac))
                {
                    if (mac.Length == 0) throw new ConfigException($"--net \"{text}\": mac= needs an address (52:54:00:xx:xx:xx)");
                    yield return ("net.mac", mac);
                }
            }

            /// <summary>The options that would shape another machine than a snapshot's.</summary>
            public string[] Shaping(ParseResult parse) => new (string Option, bool Given)[]
            {
                ("--memory", parse.GetValue(Memory) is not null), ("--cpus", parse.GetValue(Cpus) is not null),
                ("--lapic", parse.GetValue(Lapic) is not null), ("--cpu", parse.GetValue(Cpu) is not null),
                ("--shm", parse.GetValue(Shm) is not null), ("--test-devices", parse.GetValue(TestDevices)),
                ("--rng", parse.GetValue(Rng)), ("--disk", parse.GetValue(Disk) is not null), ("--virtio-console", parse.GetValue(VirtioConsole)), ("--net", parse.GetValue(Net) is not null),
                ("--kernel", parse.GetValue(Kernel) is not null), ("--initrd", parse.GetValue(Initrd) is not null),
                ("--append", parse.GetValue(Append) is not null), ("--firmware", parse.GetValue(Firmware) is not null),
                ("--flat", parse.GetValue(Flat) is not null),
            }.Where(o => o.Given).Select(o => o.Option).ToArray();
        }

        private static Command RunCommand()
        {
            var options = new VmOptions();
            var name = new Option<string?>("--name") { Description = "VM name" };
            var restore = new Option<string?>("--restore") { Description = "start the VM snapshotted in DIR (`ctl snapshot`) where it stopped; its pages are read on first touch" };
            var restoreEager = new Option<bool>("--restore-eager") { Description = "with --restore: read all of guest memory before the first instruction" };
            var command = new Command("run", "run a VM") { name, restore, restoreEager };
            options.AddTo(command);
            command.SetAction(async (parse, _) =>
            {
                var settings = options.Settings(parse, absolute: false);
                if (parse.GetValue(name) is { } n) settings.Add(new("actorvmm.vm.name", n));
                var hocon = ConfigValues.From(settings).WithFallback(VmConfig.Load(parse.GetValue(options.Config)));
                var vm = VmConfig.From(hocon);

                if (parse.GetValue(restore) is { } snapshotDir)
                {
                    // The snapshot is the machine: what would shape another one is refused, not ignored.
                    var shaping = options.Shaping(parse);
                    if (shaping.Length > 0)
                        throw new ConfigException($"--restore starts the machine the snapshot holds: {string.Join(", ", shaping)} cannot change it");
                    // The actor system starts on a thread of its own while the snapshot is read and checked.
                    HostRunner.ConfigureLogging();
                    var starting = HostRunner.StartSystem(hocon);
                    Snapshot.VmRestore restored;
                    try { restored = Snapshot.VmRestore.Open(snapshotDir, parse.GetValue(restoreEager)); }
                    catch (Snapshot.SnapshotException e)
                    {
                        await Console.Error.WriteLineAsync($"actorvmm: error: cannot restore: {e.Message}");
                        try { await (await starting).Terminate(); }
                        catch (Exception) { } // its own failure to start does not matter now
                        return VmProtocol.Outcome.HostErrorCode;
                    }
                    if (parse.GetValue(name) is null) vm = vm with { Name = restored.Spec.Name };
                    StartupTimes.Mark("snapshot read");
                    return await HostRunner.RunAsync(starting, hocon, vm, restored.ToSpec(vm.Name).Boot,
                        new HostRunner.RunOptions(), Console.Error, restored);
                }
                if (parse.GetValue(restoreEager)) throw new ConfigException("--restore-eager goes with --restore DIR");

                var boot = BootSource.FromConfig(hocon);
                StartupTimes.Mark("config");
                HostRunner.ConfigureLogging();
                return await HostRunner.RunAsync(HostRunner.StartSystem(hocon), hocon, vm, boot, new HostRunner.RunOptions(), Console.Error);
            });
            return command;
        }

        /// <summary>`actorvmm host`: a host node of a cluster (see Cluster.HostNode).</summary>
        private static Command HostCommand()
        {
            var config = new Option<string?>("--config") { Description = "a HOCON file: actorvmm.cluster settings and the defaults of the node's VMs" };
            var port = new Option<string?>("--port") { Description = "the port the node listens on (default actorvmm.cluster.port; 0 = any free port)" };
            var hostname = new Option<string?>("--hostname") { Description = "the address the node listens on (default 127.0.0.1)" };
            var seeds = new Option<string[]>("--seed") { Description = "HOST:PORT of a node to join (repeat for several); none: start a new cluster", AllowMultipleArgumentsPerToken = false };
            var roles = new Option<string?>("--roles") { Description = "the node's cluster roles, comma-separated" };
            var directory = new Option<string?>("--directory") { Description = "the host directory (announcements, cluster certificate)" };
            var certificate = new Option<string?>("--certificate") { Description = "the cluster certificate (default: cluster.pfx in the host directory)" };
            var command = new Command("host", "run a host node: join (or start) a cluster and run the VMs `ctl run` places on it")
                { config, port, hostname, seeds, roles, directory, certificate };
            command.SetAction(async (parse, _) =>
            {
                var settings = new List<KeyValuePair<string, string>>();
                if (parse.GetValue(port) is { } p) settings.Add(new("actorvmm.cluster.port", p));
                if (parse.GetValue(hostname) is { } h) settings.Add(new("actorvmm.cluster.hostname", h));
                if (parse.GetValue(directory) is { } d) settings.Add(new("actorvmm.control.directory", d));
                if (parse.GetValue(certificate) is { } c) settings.Add(new("actorvmm.cluster.certificate", c));
                var hocon = ConfigValues.From(settings).WithFallback(VmConfig.Load(parse.GetValue(config)));
                if (parse.GetValue(roles) is { } r)
                    hocon = ConfigurationFactory.ParseString($"actorvmm.cluster.roles = [{string.Join(", ", r.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(x => "\"" + x.Replace("\"", "") + "\""))}]").WithFallback(hocon);
                var seedList = parse.GetValue(seeds) is { Length: > 0 } given ? given : hocon.GetStringList("actorvmm.cluster.seeds")?.ToArray() ?? [];
                HostRunner.ConfigureLogging(Serilog.Events.LogEventLevel.Information);
                return await Cluster.HostNode.RunAsync(hocon, seedList, Console.Out, Console.Error);
            });
            return command;
        }

        private static Command DemoCommand()
        {
            var trace = new Option<string?>("--trace") { Description = "also write the message trace to FILE as JSON lines" };
            var perfetto = new Option<string?>("--perfetto") { Description = "also write the trace to FILE for the Perfetto UI" };
            var command = new Command("demo", "boot the built-in guest and show its message trace") { trace, perfetto };
            command.SetAction(async (parse, _) =>
            {
                var hocon = ConfigValues.From(new Dictionary<string, string>
                {
                    ["actorvmm.vm.name"] = "demo",
                    ["actorvmm.vm.memory"] = "16M",
                    ["actorvmm.vm.serial.input"] = "none",
                    ["actorvmm.vm.timeout"] = "30",
                    ["actorvmm.vm.trace"] = parse.GetValue(trace) ?? "",
                    ["actorvmm.vm.perfetto"] = parse.GetValue(perfetto) ?? "",
                }).WithFallback(VmConfig.Load(null));
                var vm = VmConfig.From(hocon);
                HostRunner.ConfigureLogging();
                var system = HostRunner.StartSystem(hocon);
                Console.Error.WriteLine("actorvmm demo: booting a 64-bit guest assembled at run time; it prints on COM1 and halts.");
                return await HostRunner.RunAsync(system, hocon, vm, DemoGuest.Build(), new HostRunner.RunOptions(PrintTrace: true), Console.Error);
            });
            return command;
        }

        /// <summary>`actorvmm ctl ...`: talk to running host processes (see HostDirectory).</summary>
        private static Command CtlCommand()
        {
            var ctl = new Command("ctl", "inspect and control running VMs (the seed's vmmctl)");
            var wait = new Option<double>("--wait")
            {
                Description = "seconds to wait for a host to answer (default 5; more for a slow or loaded machine)",
                DefaultValueFactory = _ => Control.ControlClient.DefaultTimeout.TotalSeconds,
                Recursive = true,
            };
            wait.Validators.Add(r =>
            {
                if (r.GetValueOrDefault<double>() is <= 0 or > 3600) r.AddError("--wait takes 0 to 3600 seconds");
            });
            ctl.Add(wait);
            var directory = new Option<string?>("--directory") { Description = "the host directory: where hosts announce themselves and keep the cluster certificate", Recursive = true };
            var certificate = new Option<string?>("--certificate") { Description = "the hosts' cluster certificate (default: cluster.pfx in the host directory)", Recursive = true };
            ctl.Add(directory);
            ctl.Add(certificate);
            Control.ControlClient Client(System.CommandLine.ParseResult parse) =>
                Control.ControlClient.Create(TimeSpan.FromSeconds(parse.GetValue(wait)), parse.GetValue(directory), parse.GetValue(certificate));
            Option<string?> Host() => new("--host") { Description = "a host's control address HOST:PORT (default: every announced host)" };
            Option<string> Vm() => new("--vm") { Description = "the VM's name", Required = true };

            Command WithVm(string name, string description, Func<Control.ControlClient, Akka.Actor.IActorRef, System.CommandLine.ParseResult, Task<string>> action,
                params Option[] extra)
            {
                var host = Host();
                var vm = Vm();
                var command = new Command(name, description) { vm, host };
                foreach (var o in extra) command.Add(o);
                command.SetAction(async (parse, _) =>
                {
                    await using var client = Client(parse);
                    var target = await client.FindVmAsync(parse.GetValue(vm)!,
                        Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory)));
                    Console.Out.Write(await action(client, target, parse));
                    return 0;
                });
                return command;
            }

            {
                var host = Host();
                var list = new Command("list", "list the running VMs") { host };
                list.SetAction(async (parse, _) =>
                {
                    await using var client = Client(parse);
                    // Nodes of one cluster each answer with the whole cluster's VMs: each VM once.
                    var seen = new HashSet<(string, string)>();
                    foreach (var h in Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory)))
                    {
                        var vms = await client.ListAsync(h);
                        foreach (var v in vms.Vms)
                        {
                            if (!seen.Add((v.Node, v.Name))) continue;
                            if (v.Ended.Length > 0)
                            {
                                Console.Out.WriteLine($"{v.Name,-16} {"Ended",-8} node={v.Node} {v.Ended}");
                                continue;
                            }
                            var status = await client.StatusAsync(v.Actor);
                            Console.Out.WriteLine($"{v.Name,-16} {status.Phase,-8} vcpus={status.Vcpus,-3} node={v.Node}{(v.Origin.Length > 0 ? $" ({v.Origin})" : "")}");
                        }
                    }
                    return 0;
                });
                ctl.Add(list);
            }
            var vcpu = new Option<int>("--vcpu") { Description = "vcpu number", DefaultValueFactory = _ => 0 };
            ctl.Add(WithVm("regs", "dump a vcpu's registers and the code at RIP", async (c, vm, parse) =>
            {
                var (regs, code, linear) = await c.RegistersAsync(vm, parse.GetValue(vcpu));
                var lapic = await c.LapicAsync(vm, parse.GetValue(vcpu));
                return Control.RegisterDump.Format(regs, code, linear) + lapic;
            }, vcpu));
            ctl.Add(WithVm("pause", "pause every vcpu", async (c, vm, _) => $"{(await c.PauseAsync(vm)).Phase}\n"));
            ctl.Add(WithVm("resume", "resume a paused VM", async (c, vm, _) => $"{(await c.ResumeAsync(vm)).Phase}\n"));
            ctl.Add(WithVm("stop", "stop the VM", async (c, vm, _) => $"{(await c.StopAsync(vm)).Phase}\n"));
            var snapshotTo = new Option<string>("--to") { Description = "the directory to write the snapshot to (new or empty)", Required = true };
            var snapshotStop = new Option<bool>("--stop") { Description = "end the VM once it is snapshotted" };
            ctl.Add(WithVm("snapshot", "pause the VM, save all of its state to a directory, resume it (run --restore DIR starts it again)",
                async (c, vm, parse) => await c.SnapshotAsync(vm, parse.GetValue(snapshotTo)!, parse.GetValue(snapshotStop)), snapshotTo, snapshotStop));
            ctl.Add(WithVm("stats", "counters of vcpus, devices and memory", async (c, vm, _) => await c.StatsAsync(vm)));
            var faultActor = new Option<string>("--actor") { Description = "the actor below the VM: uart0, vcpu-0, vmspace, ... (--fail-page-faults: vmspace)" };
            var crash = new Option<bool>("--crash") { Description = "make the actor throw (its supervisor restarts or stops it)" };
            var stall = new Option<int?>("--stall") { Description = "stall the actor's thread for this many milliseconds (a vcpu neither runs nor answers)" };
            var failFaults = new Option<int?>("--fail-page-faults") { Description = "fail the vmspace's next N nested page faults (the VM stops with a report)" };
            var gpa = new Option<string?>("--gpa") { Description = "with --fail-page-faults: only faults on the page of this guest physical address" };
            ctl.Add(WithVm("fault", "inject a fault into a live VM", async (c, vm, parse) =>
            {
                const string reason = "injected by actorvmm ctl";
                var actor = parse.GetValue(faultActor);
                var chosen = (parse.GetValue(crash) ? 1 : 0) + (parse.GetValue(stall) is null ? 0 : 1) + (parse.GetValue(failFaults) is null ? 0 : 1);
                if (chosen != 1) throw new Control.ControlException("say which one fault: --crash, --stall MS or --fail-page-faults N");
                if (parse.GetValue(failFaults) is { } count)
                {
                    if (actor is not null and not "vmspace") throw new Control.ControlException("--fail-page-faults goes to the vmspace: leave out --actor or give --actor vmspace");
                    var page = parse.GetValue(gpa) is { } text ? ParseNumber(text, "--gpa") : (ulong?)null;
                    return await c.InjectAsync(vm, "vmspace", new FaultProtocol.FailNestedPageFaults(count, page, reason), TimeSpan.Zero);
                }
                if (actor is null) throw new Control.ControlException("say which actor: --actor uart0, vcpu-0, vmspace, ...");
                if (parse.GetValue(stall) is { } ms)
                {
                    if (ms < 0 || ms > FaultProtocol.MaxStall.TotalMilliseconds)
                        throw new Control.ControlException($"--stall takes 0 to {FaultProtocol.MaxStall.TotalMilliseconds:0} milliseconds");
                    var duration = TimeSpan.FromMilliseconds(ms);
                    return await c.InjectAsync(vm, actor, new FaultProtocol.Stall(duration, reason), duration);
                }
                return await c.CrashAsync(vm, actor, reason);
            }, faultActor, crash, stall, failFaults, gpa));
            {
                var host = Host();
                var vm = Vm();
                var follow = new Option<bool>("--follow", "-f") { Description = "print new messages as they happen (Ctrl-C to stop)" };
                var filter = new Option<string?>("--filter") { Description = "actor=NAME,type=NAME,sample=N" };
                var count = new Option<int>("--count", "-n") { Description = "how many lines (default: 50 recent; unlimited with --follow)", DefaultValueFactory = _ => 0 };
                var trace = new Command("trace", "the message trace of a VM: recent messages, or a live tail") { vm, host, follow, filter, count };
                trace.SetAction(async (parse, cancel) =>
                {
                    await using var client = Client(parse);
                    var entry = await client.FindEntryAsync(parse.GetValue(vm)!, Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory)));
                    var text = parse.GetValue(filter) ?? "";
                    if (!parse.GetValue(follow))
                    {
                        var n = parse.GetValue(count);
                        foreach (var line in await client.RecentTraceAsync(entry, n > 0 ? n : 50, text)) Console.Out.WriteLine(line);
                        return 0;
                    }
                    using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancel);
                    Console.CancelKeyPress += (_, e) => { e.Cancel = true; stop.Cancel(); };
                    await client.FollowTraceAsync(entry, text, parse.GetValue(count), line => Console.Out.WriteLine(line), stop.Token);
                    return 0;
                });
                ctl.Add(trace);
            }
            {
                var host = Host();
                var vmName = Vm();
                var node = new Option<string?>("--node") { Description = "the node to run it on, HOST:PORT (default: the least loaded)" };
                var options = new VmOptions();
                var run = new Command("run", "start a VM on a host node of the cluster (actorvmm host); file paths are the node's") { vmName, host, node };
                options.AddTo(run);
                run.SetAction(async (parse, _) =>
                {
                    var settings = options.Settings(parse, absolute: true);
                    if (parse.GetValue(options.Config) is { } file)
                    {
                        // The file is read here; what it says about the VM is sent as settings (never as HOCON text a host would parse).
                        var fromFile = ConfigValues.Flatten(VmConfig.Load(file), "actorvmm.vm").Where(kv => !settings.Any(s => s.Key == kv.Key));
                        settings.InsertRange(0, fromFile);
                    }
                    await using var client = Client(parse);
                    var hosts = Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory));
                    var placed = await client.RunVmAsync(hosts[0], parse.GetValue(vmName)!, settings, parse.GetValue(node));
                    Console.Out.WriteLine($"{parse.GetValue(vmName)} runs on {placed}");
                    return 0;
                });
                ctl.Add(run);
            }
            {
                var host = Host();
                var vmName = Vm();
                var to = new Option<string>("--to") { Description = "the node to move it to, HOST:PORT (ctl nodes lists them)", Required = true };
                var maxDowntime = new Option<string>("--max-downtime")
                {
                    Description = "pre-copy rounds go on until what is left would stop the guest no longer than this (e.g. 300ms, 1s)",
                    DefaultValueFactory = _ => "300ms",
                };
                var stopAndCopy = new Option<bool>("--stop-and-copy") { Description = "no pre-copy: stop the guest first, then copy all of it" };
                var migrate = new Command("migrate",
                    "move a running VM to another host node: memory copied while it runs (pre-copy rounds), then stopped, the rest copied, resumed there")
                    { vmName, host, to, maxDowntime, stopAndCopy };
                migrate.SetAction(async (parse, _) =>
                {
                    var limit = VmConfig.ParseInterval(parse.GetValue(maxDowntime)!, "--max-downtime");
                    if (limit == TimeSpan.Zero) throw new ConfigException("--max-downtime must be a duration like 300ms or 1s, not 0");
                    await using var client = Client(parse);
                    var entry = await client.FindEntryAsync(parse.GetValue(vmName)!, Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory)));
                    Console.Out.Write(await client.MigrateAsync(entry, parse.GetValue(to)!, p => Console.Out.WriteLine(p),
                        limit, parse.GetValue(stopAndCopy)));
                    return 0;
                });
                ctl.Add(migrate);
            }
            {
                var host = Host();
                var nodes = new Command("nodes", "the host nodes of the cluster: address, status, reachability, roles") { host };
                nodes.SetAction(async (parse, _) =>
                {
                    await using var client = Client(parse);
                    var members = await client.NodesAsync(Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory))[0]);
                    foreach (var m in members.Nodes)
                        Console.Out.WriteLine($"{m.Node,-22} {m.Status,-8} {(m.Reachable ? "reachable" : "unreachable"),-11}{(m.Node == members.Leader ? " leader" : "")}" +
                                              $"{(m.Roles.Length > 0 ? " roles=" + string.Join(",", m.Roles) : "")}");
                    return 0;
                });
                ctl.Add(nodes);
            }
            {
                var host = Host();
                var vmName = Vm();
                var follow = new Option<bool>("--follow", "-f") { Description = "keep printing what the guest writes, and send what you type to it (Ctrl-C to stop)" };
                var console = new Command("console", "a VM's serial console, wherever it runs: what it wrote so far, or a live session") { vmName, host, follow };
                console.SetAction(async (parse, cancel) =>
                {
                    await using var client = Client(parse);
                    var entry = await client.FindEntryAsync(parse.GetValue(vmName)!, Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(directory)));
                    using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancel);
                    Console.CancelKeyPress += (_, e) => { e.Cancel = true; stop.Cancel(); };
                    var follow_ = parse.GetValue(follow);
                    var ended = await client.ConsoleAsync(entry, follow_, Console.OpenStandardOutput(), follow_ ? Console.In : null, stop.Token);
                    if (ended is not null) await Console.Error.WriteLineAsync($"actorvmm: {entry.Name}: {ended}");
                    return 0;
                });
                ctl.Add(console);
            }
            ctl.Add(WithVm("mem", "guest memory: resident, swapped, held, accessed and dirty pages and nested page faults", async (c, vm, _) => await c.MemoryAsync(vm)));
            return ctl;
        }

        public static ulong ParseNumber(string text, string what) => BootSource.ParseNumber(text, what);

        public static (ushort Cs, ushort Ip) ParseEntry(string text) => BootSource.ParseEntry(text);
    }
}
