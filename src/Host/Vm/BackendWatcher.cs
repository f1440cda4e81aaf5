using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using Serilog;

namespace ActorVmm.Host.Vm;

/// <summary>
/// Watches a device's TAP interface on a thread of its own (poll(2) on its fd) and tells the device actor
/// <see cref="DeviceProtocol.BackendReady"/> when frames arrive, then waits for its answer before polling
/// again: the model reads the TAP itself, on its actor's thread, so the frames reach the driver's
/// receive buffers (and its interrupt is sent) without the guest polling, and at most one such message
/// is in flight. While the device cannot take frames it drops them (<c>IVirtioBackendInput</c>), so
/// the fd does not stay readable and this thread does not spin; frames beyond what the device holds
/// wait in the TAP's own queue (the interface's txqueuelen), which the kernel bounds by dropping.
///
/// The device actor is resolved first (the VM creates it after this starts), then asked by its ref (a
/// restarted actor keeps it). An answer that does not come (an actor restarting, a stalled one) is
/// asked again once its wait ends. Stops when the VM has ended or on <see cref="Dispose"/>, and when the
/// interface disappears under the fd (logged: the VM goes on without a link).
/// </summary>
public sealed class BackendWatcher : IDisposable
{
    /// <summary>How long one poll lasts: how late the thread sees that it must stop.</summary>
    public const int PollMilliseconds = 100;

    /// <summary>How long an answer to one <see cref="DeviceProtocol.BackendReady"/> is waited for.</summary>
    public static readonly TimeSpan AnswerTimeout = TimeSpan.FromSeconds(30);

    private readonly TapDevice _tap;
    private readonly ActorSelection _device;
    private readonly Task _ended;
    private readonly Thread _thread;
    private readonly CancellationTokenSource _stopping = new();
    private long _asked;

    /// <summary>How many times the device was told that frames arrived.</summary>
    public long Notifications => Interlocked.Read(ref _asked);

    /// <param name="tap">the interface (owned by the caller, disposed after this)</param>
    /// <param name="device">the device actor, by its path</param>
    /// <param name="ended">completes when the VM has ended</param>
    public BackendWatcher(TapDevice tap, ActorSelection device, Task ended)
    {
        _tap = tap;
        _device = device;
        _ended = ended;
        _thread = new Thread(Run) { IsBackground = true, Name = $"tap-{tap.Name}" };
        ended.ContinueWith(_ => Stop(), TaskScheduler.Default);
    }

    public BackendWatcher Start()
    {
        _thread.Start();
        return this;
    }

    private bool Stopping => _stopping.IsCancellationRequested || _ended.IsCompleted;

    private void Stop()
    {
        try { _stopping.Cancel(); }
        catch (ObjectDisposedException) { }
    }

    private void Run()
    {
        var device = Resolve();
        while (device is not null && !Stopping)
        {
            bool readable;
            try { readable = _tap.WaitReadable(PollMilliseconds); }
            catch (TapException e)
            {
                Log.Warning("virtio-net: {Reason}; no more frames reach the guest", e.Message);
                return;
            }
            catch (ObjectDisposedException) { return; }
            if (!readable || Stopping) continue;
            var id = Interlocked.Increment(ref _asked);
            try { device.Ask<DeviceProtocol.Completed>(new DeviceProtocol.BackendReady(id), AnswerTimeout, _stopping.Token).GetAwaiter().GetResult(); }
            catch (AskTimeoutException) { } // asked again: the fd is still readable
            catch (OperationCanceledException) { }
        }
    }

    /// <summary>The device actor once it exists; null if the VM ended first.</summary>
    private IActorRef? Resolve()
    {
        while (!Stopping)
        {
            try
            {
                var identity = _device.Ask<ActorIdentity>(new Identify(null), TimeSpan.FromSeconds(5), _stopping.Token).GetAwaiter().GetResult();
                if (identity.Subject is { } found) return found;
            }
            catch (AskTimeoutException) { }
            catch (OperationCanceledException) { }
            Thread.Sleep(PollMilliseconds / 4);
        }
        return null;
    }

    /// <summary>Stops the thread and waits for it (at most one poll and one answer's wait).</summary>
    public void Dispose()
    {
        Stop();
        if (_thread.IsAlive && Thread.CurrentThread != _thread) _thread.Join();
    }
}
