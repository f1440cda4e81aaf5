namespace ActorVmm.Devices;

/// <summary>Snapshot of an <see cref="I8042"/>. <see cref="PendingCommand"/> is 0 when no command awaits its data byte.</summary>
public sealed record I8042State(
    byte CommandByte,
    byte OutputPort,
    byte OutputBuffer,
    bool OutputBufferFull,
    byte PendingCommand,
    bool LastWriteWasCommand);

/// <summary>
/// Just enough of the 8042 PS/2 controller for a guest to probe it and to reset the machine
/// through it. One device covering ports 0x60..0x64 (offset 0 = data, offset 4 = command/status;
/// offsets 1..3 are unassigned, read all ones). Port 0x61 (system control port B) is not part of it.
///
/// No keyboard or mouse is attached: bytes written to the data port without a pending controller
/// command are dropped, and the controller raises no interrupts (it only answers commands).
/// </summary>
public sealed class I8042(IPlatformEvents events) : IStatefulDevice
{
    public const ulong DataOffset = 0;
    public const ulong CommandOffset = 4;
    public const ulong Length = 5;

    // Status register bits.
    private const byte StatusOutputFull = 0b0000_0001;
    private const byte StatusSystemFlag = 0b0000_0100;
    private const byte StatusCommandLast = 0b0000_1000; // last write went to the command port
    private const byte StatusUnlocked = 0b0001_0000;    // keyboard not inhibited by the key lock

    // Command byte bits.
    private const byte CommandByteSystemFlag = 0b0000_0100;
    private const byte CommandByteKeyboardDisabled = 0b0001_0000;

    // Output port bits.
    private const byte OutputPortResetLine = 0b0000_0001; // 0 = hold the CPU in reset

    // Controller commands.
    private const byte CmdReadCommandByte = 0x20;
    private const byte CmdWriteCommandByte = 0x60;
    private const byte CmdSelfTest = 0xAA;
    private const byte CmdTestKeyboardPort = 0xAB;
    private const byte CmdDisableKeyboard = 0xAD;
    private const byte CmdEnableKeyboard = 0xAE;
    private const byte CmdReadOutputPort = 0xD0;
    private const byte CmdWriteOutputPort = 0xD1;
    private const byte CmdPulseOutputLinesMask = 0xF0; // 0xF0..0xFF: pulse lines whose bit is 0 (bit 0 = reset)

    private const byte SelfTestPassed = 0x55;
    private const byte PortTestPassed = 0x00;

    /// <summary>Keyboard interrupt enabled and system flag set (POST passed), as firmware leaves it.</summary>
    private const byte DefaultCommandByte = 0b0000_0101;

    /// <summary>Reset line high (not in reset), A20 enabled, unused bits one, as in QEMU.</summary>
    private const byte DefaultOutputPort = 0b1100_1111;

    private byte _commandByte = DefaultCommandByte;
    private byte _outputPort = DefaultOutputPort;
    private byte _output;
    private bool _outputFull;
    private byte _pendingCommand;
    private bool _lastWriteWasCommand;

    public ulong Read(ulong offset, int size)
    {
        switch (offset)
        {
            case DataOffset:
                // Reading an empty buffer returns the last byte again, as real controllers do.
                _outputFull = false;
                return _output;
            case CommandOffset:
                return Status();
            default:
                return 0xFF;
        }
    }

    public void Write(ulong offset, int size, ulong value)
    {
        var b = (byte)value;
        switch (offset)
        {
            case DataOffset:
                _lastWriteWasCommand = false;
                WriteData(b);
                break;
            case CommandOffset:
                _lastWriteWasCommand = true;
                WriteCommand(b);
                break;
        }
    }

    object IStatefulDevice.SaveState() => State();

    public I8042State State() =>
        new(_commandByte, _outputPort, _output, _outputFull, _pendingCommand, _lastWriteWasCommand);

    public static I8042 FromState(I8042State state, IPlatformEvents events) => new(events)
    {
        _commandByte = state.CommandByte,
        _outputPort = state.OutputPort,
        _output = state.OutputBuffer,
        _outputFull = state.OutputBufferFull,
        _pendingCommand = state.PendingCommand,
        _lastWriteWasCommand = state.LastWriteWasCommand,
    };

    private byte Status() => (byte)(
        (_outputFull ? StatusOutputFull : 0)
        | (_commandByte & CommandByteSystemFlag) // the system flag follows command byte bit 2
        | (_lastWriteWasCommand ? StatusCommandLast : 0)
        | StatusUnlocked);

    private void WriteCommand(byte command)
    {
        // A new command abandons one still waiting for its data byte.
        _pendingCommand = 0;
        switch (command)
        {
            case CmdReadCommandByte:
                Respond(_commandByte);
                break;
            case CmdWriteCommandByte:
            case CmdWriteOutputPort:
                _pendingCommand = command;
                break;
            case CmdSelfTest:
                Respond(SelfTestPassed);
                break;
            case CmdTestKeyboardPort:
                Respond(PortTestPassed);
                break;
            case CmdDisableKeyboard:
                _commandByte |= CommandByteKeyboardDisabled;
                break;
            case CmdEnableKeyboard:
                _commandByte &= unchecked((byte)~CommandByteKeyboardDisabled);
                break;
            case CmdReadOutputPort:
                Respond(_outputPort);
                break;
            case var pulse when (pulse & CmdPulseOutputLinesMask) == CmdPulseOutputLinesMask:
                // 0xFE is the usual "pulse reset"; any 0xFx with bit 0 clear pulses the reset line.
                if ((pulse & OutputPortResetLine) == 0) events.RequestReset("i8042 reset");
                break;
            default:
                break; // unimplemented commands are ignored; a guest waiting for a reply times out
        }
    }

    private void WriteData(byte b)
    {
        var command = _pendingCommand;
        _pendingCommand = 0;
        switch (command)
        {
            case CmdWriteCommandByte:
                _commandByte = b;
                break;
            case CmdWriteOutputPort:
                _outputPort = b;
                if ((b & OutputPortResetLine) == 0) events.RequestReset("i8042 reset");
                break;
            default:
                break; // would go to the keyboard; none is attached
        }
    }

    private void Respond(byte b)
    {
        _output = b;
        _outputFull = true;
    }
}
